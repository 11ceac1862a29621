#!/usr/bin/env bash
# GPU probe: Polar Express kernels, a short compiled `small` run with recompile logging, then the
# speedrun-shape step-time benchmark. Usage on the GPU machine: bash benchmarks/gpu_probe.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 90 python3 benchmarks/bench_polar.py 2>&1 | tail -8
T0=$(date +%s)
TORCH_LOGS=recompiles timeout ${SMALL_TIMEOUT:-240} python3 -m trainer.train --preset small --set data.data_dir=/tmp/data/probe \
  --set data.synth.train_tokens=20000000 --set schedule.num_scheduled_iterations=60 \
  --set schedule.num_extension_iterations=0 --set eval.val_loss_every=30 > "$OUT/small_probe.jsonl" 2> "$OUT/small_probe.err"
echo "small probe exit $? in $(( $(date +%s) - T0 )) s"; grep -v '"start"' "$OUT/small_probe.jsonl" | grep -E '"warmup"|"val"|"end"|"error"'; grep -E "^\[trainer\]|Recompil|triggered by|error" "$OUT/small_probe.err" | head -30

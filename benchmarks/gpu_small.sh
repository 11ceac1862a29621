#!/usr/bin/env bash
# The `small` preset's full run on one GPU (issue "Trainer", goal < 3 min on one H100 including
# compile): generates its synthetic shards first (timed apart), then runs the whole preset twice
# under torchrun -- once with empty inductor/Triton caches (cold) and once right after (warm) --
# and prints each run's wall time, compile/warmup seconds, val losses and end event.
#   bash benchmarks/gpu_small.sh          # on the GPU machine; JSON lines land in $OUT
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCHINDUCTOR_CACHE_DIR=/tmp/small-inductor TRITON_CACHE_DIR=/tmp/small-triton
DATA=/tmp/data/synth-small
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m trainer.data synth --out $DATA --train-tokens 100000000 --val-tokens 1048576
for pass in ${PASSES:-cold warm}; do
  [ "$pass" = cold ] && rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR"
  T0=$(date +%s.%N)
  timeout ${RUN_TIMEOUT:-280} python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m trainer.train --preset small \
    --set data.data_dir=$DATA > "$OUT/small_$pass.jsonl" 2> "$OUT/small_$pass.err"
  rc=$?
  echo "small ($pass caches): exit $rc, wall $(python3 -c "import time; print(round(time.time() - $T0, 1))") s"
  grep -E '"(val|end|error)"' "$OUT/small_$pass.jsonl" | cut -c1-400
  grep -E '^\[trainer\]' "$OUT/small_$pass.err" | tail -6
done

#!/usr/bin/env bash
# The `speedrun` preset's step time per batch stage at world size NPROC (issues "Trainer" and "On
# GPUs"): synthetic shards, then benchmarks/bench_trainer.py with dynamo's INFO log (per-graph
# trace/compile timestamps and the compile-time table at exit) saved to $OUT/speedrun_ws*.err.
# Caches live in /tmp: a second call on the same (still warm) machine reuses them.
#   NPROC=2 bash benchmarks/gpu_speedrun.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; NPROC=${NPROC:-1}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton TORCH_LOGS=dynamo
nvidia-smi -L
[ -d /tmp/data/speedrun ] || python3 -m trainer.data synth --out /tmp/data/speedrun --train-tokens 30000000 --val-tokens 2097152
T0=$(date +%s)
timeout ${RUN_TIMEOUT:-570} python3 benchmarks/bench_trainer.py --preset speedrun --nproc "$NPROC" --steps-per-stage 30 \
  --set data.data_dir=/tmp/data/speedrun --set data.synthetic=false --set runtime.warmup_steps_per_stage=2 \
  --out "$OUT/speedrun_ws$NPROC.jsonl" 2> "$OUT/speedrun_ws$NPROC.err"
echo "bench exit $? in $(( $(date +%s) - T0 )) s"
grep -E '^\[trainer\]|"warmup"' "$OUT/speedrun_ws$NPROC.err" "$OUT/speedrun_ws$NPROC.jsonl" | cut -c1-200
grep -E '(Step 1: torchdynamo start tracing|Step 2: done compiler)' "$OUT/speedrun_ws$NPROC.err" | cut -c1-200 | sed -E 's/ [0-9]+ site-packages\/torch\/_dynamo\/[a-z_]+\.py:[0-9]+\]//' | head -80

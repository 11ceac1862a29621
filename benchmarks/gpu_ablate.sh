#!/usr/bin/env bash
# Whole-path GPU check through ablate on one multi-GPU machine (issue "On GPUs"): installs the
# carried wheel bundle (.devwheels, see ../shared/tools/device-bundle.sh), runs
# experiments/gpu_proxy.yaml (1 GPU per run), gpu_proxy_2gpu.yaml (2) or gpu_proxy_4gpu.yaml (4) on the
# embedded local Ray, and writes tables, reports, overhead accounting and the Parquet store to $OUT.
#   PART=1 bash benchmarks/gpu_ablate.sh   # 1-GPU experiment      PART=2 / PART=4 ...   # 2- / 4-GPU runs
#   REUSE=1 PART=1 bash ...                 # the same spec with resources.reuse_workers: true
#                                           # (experiment name gets "-reuse"; same-node A/B)
#   FA4_SITE=/tmp/fa4site ...               # flash-attn-4 installed there (--target): the runs' auto backend
#                                           # resolves to fa4 as on a user's H200 with it; without it, flex
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devwheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD${FA4_SITE:+:$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages} PYTHONUNBUFFERED=1 COLUMNS=200
STORE=${STORE:-/tmp/store}; NGPU=$(nvidia-smi -L | wc -l)
case "${PART:-1}" in 1) SPEC=experiments/gpu_proxy.yaml; EXP=gpu-proxy; SLOTS=$NGPU ;;
                     2) SPEC=experiments/gpu_proxy_2gpu.yaml; EXP=gpu-proxy-2gpu; SLOTS=$((NGPU / 2)) ;;
                     4) SPEC=experiments/gpu_proxy_4gpu.yaml; EXP=gpu-proxy-4gpu; SLOTS=$((NGPU / 4)) ;; esac
if [ "${REUSE:-0}" = 1 ]; then  # same runs, long-lived workers: a spec copy with its own name
  sed -e "s/^name: $EXP\$/name: $EXP-reuse/" -e 's/^resources: {\(.*\)}$/resources: {\1, reuse_workers: true}/' \
    "$SPEC" > /tmp/reuse-spec.yaml
  grep -q "reuse_workers: true" /tmp/reuse-spec.yaml && grep -q "name: $EXP-reuse" /tmp/reuse-spec.yaml \
    || { echo "REUSE=1: could not rewrite $SPEC"; exit 2; }
  SPEC=/tmp/reuse-spec.yaml; EXP=$EXP-reuse
fi
nvidia-smi -L
T0=$(date +%s.%N)
timeout ${RUN_TIMEOUT:-480} python3 -m ablate run "$SPEC" --store $STORE > "$OUT/$EXP.run.log" 2>&1; rc=$?
WALL=$(python3 -c "import time; print(round(time.time() - $T0, 1))")
echo "ablate run $SPEC: exit $rc, wall $WALL s"; tail -25 "$OUT/$EXP.run.log"
python3 -m ablate table $EXP --store $STORE --format md > "$OUT/$EXP.table.md" 2>&1
python3 -m ablate report $EXP --store $STORE 2>&1 | tail -2
python3 benchmarks/overhead.py $EXP --store $STORE --wall-s $WALL --slots $SLOTS | tee "$OUT/$EXP.overhead.txt"
python3 - <<PY
from ablate.store.parquet import Store
r = Store("$STORE").runs("$EXP")
cols = ["arm", "seed", "status", "attn_backend", "final_val_loss", "train_time_ms", "compile_s", "warmup_s", "eval_s", "launch_s", "wall_s", "worker_runs_before", "gpu_model", "gpu_uuids", "world_size", "peak_mem_mib"]
print(r.sort_values("started_at")[cols].to_string())
PY
tar czf "$OUT/$EXP.store.tgz" -C $STORE $EXP

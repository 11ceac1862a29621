#!/usr/bin/env bash
# GPU acceptance: one command on a GPU node, ≤ 10 minutes cold on one H200. Compiles and runs every
# batch stage and eval shape of every preset with every GPU attention backend, runs the GPU tests
# and `ablate run` of a one-GPU spec with reuse_workers off and on, prints one PASS/FAIL row each and
# writes docs/gpu-acceptance.md (commit, date, machine, table). Re-run it for every change to
# trainer/ or to how runs are launched, and commit the record. Rows: benchmarks/gpu_acceptance.py.
#
#   bash benchmarks/gpu_acceptance.sh                  # from the repository root, on the GPU node
#   ACCEPT_COMMIT=<sha> bash benchmarks/gpu_acceptance.sh   # where the checkout has no .git
#   bash benchmarks/gpu_acceptance.sh --resume         # a second call finishes a run cut off by a time limit
#                                                      # (jobs that passed at the same commit are kept: /tmp state)
#
# Needs: torch with CUDA; for the fa4 rows flash-attn-4 (`pip install -e ".[fa4]"`, sm90+); for the
# ablate rows ray + optuna (`pip install -e .`). On an offline machine the wheels can be carried:
# .devwheels/ (../shared/tools/device-bundle.sh) is installed here; flash-attn-4 installed under
# /tmp/fa4site (../shared/tools/fa4-bundle.sh) is put on the path. Logs and a copy of the record go
# to $OUT (default /tmp/gpu-acceptance); compile caches to /tmp, so a second run on the same machine is warm.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu-acceptance}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/acc-inductor} \
  TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/acc-triton}
extra=""
if ls .devwheels/*.whl >/dev/null 2>&1 && ! python3 -c "import ray, optuna" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devwheels/*.whl \
    2>&1 | tail -2
  extra=/tmp/site
fi
[ -d /tmp/site ] && extra=/tmp/site
[ -d /tmp/fa4site ] && extra="/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${extra:+:$extra}"
export PYTHONPATH="$PWD${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
python3 benchmarks/gpu_acceptance.py --out "$OUT" "$@"

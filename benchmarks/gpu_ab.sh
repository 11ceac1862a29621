#!/usr/bin/env bash
# A/B of two trainer trees on one GPU, same host: the `small` preset shortened to STEPS steps,
# runs interleaved A B A B (first pair cold, second pair with warm compile caches), median
# step time over steps 20..STEPS, warmup and compile seconds of each.
#   bash benchmarks/gpu_ab.sh DIR_A DIR_B      (each a checkout of this repo)
set -u
A=$1; B=$2; STEPS=${STEPS:-200}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ab-inductor TRITON_CACHE_DIR=/tmp/ab-triton
for round in 1 2; do for side in A B; do
  dir=${!side}; log="$OUT/ab_${side}${round}.jsonl"
  (cd "$dir" && PYTHONPATH=$dir timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m trainer.train --preset small --set data.data_dir=/tmp/data/ab --set data.synth.train_tokens=20000000 \
    --set schedule.num_scheduled_iterations=$STEPS --set schedule.num_extension_iterations=0 \
    --set eval.val_loss_every=0 > "$log" 2> "$OUT/ab_${side}${round}.err")
  python3 - "$log" "$side$round" <<'PY'
import json, statistics, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
st = [e["step_ms"] for e in ev if e["event"] == "step" and e["step"] > 20]
end = next((e for e in ev if e["event"] == "end"), {})
print(f"{sys.argv[2]}: median step {statistics.median(st) if st else float('nan'):.2f} ms over {len(st)} steps, "
      f"warmup_s {end.get('warmup_s', float('nan')):.1f}, compile_s {end.get('compile_s', float('nan')):.1f}, "
      f"final_val_loss {end.get('final_val_loss', float('nan')):.4f}")
PY
done; done

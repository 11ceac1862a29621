"""Per-stage step time, tokens/s and MFU of the trainer on GPU.

    python benchmarks/bench_trainer.py --preset speedrun --nproc 1 --steps-per-stage 40 \
        --set data.data_dir=/tmp/data/synth-speedrun --set data.synthetic=true

Runs the trainer under torchrun with the preset's batch-size stages shortened to
`--steps-per-stage` steps each (schedule.num_scheduled_iterations = stages × steps, no
extension, validation only at the end on one val batch), reads its JSON lines, and prints per
stage: median ms/step (first 5 steps of each stage dropped), tokens/s, and model FLOPs
utilisation.

FLOPs per token (forward + backward = 3 × forward):
    6 · N_matmul  +  6 · Σ_attention layers 2 · d · w_eff
where N_matmul counts the weights used in matrix products per token (attention 4·d² per
attention layer, MLP 2·r·d² per MLP layer, lm_head d·V_padded), d the model width, and w_eff the
mean number of keys a query attends to, taken as half the layer's window (causal within the
window; document masking lowers it further, so this is an upper bound of the useful FLOPs).
MFU = tokens/s × FLOPs/token ÷ (GPUs × peak), with peak = 989 TFLOP/s (H100 SXM dense bf16 datasheet) or
--peak-tflops.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from trainer.config import parse_set # noqa: E402
from trainer.presets import load_config


def flops_per_token(cfg, window_blocks: int) -> float:
    m = cfg.model
    d = m.model_dim
    attn_layers = [i for i in range(m.num_layers) if i not in m.no_attn_layers]
    mlp_layers = [i for i in range(m.num_layers) if i not in m.no_mlp_layers]
    n_matmul = len(attn_layers) * 4 * d * d + len(mlp_layers) * 2 * m.mlp_ratio * d * d + d * m.padded_vocab
    bs = cfg.schedule.block_size
    attn = 0.0
    for i in attn_layers:
        w = window_blocks * bs if i in m.long_window_layers else (window_blocks // 2) * bs
        attn += 2 * d * (w / 2)
    return 6 * n_matmul + 6 * attn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="speedrun")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--steps-per-stage", type=int, default=40)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", default="", help="write the raw JSON lines here")
    args = ap.parse_args(argv)

    base = load_config(args.preset, parse_set(args.sets))
    stages = len(base.schedule.train_bs_schedule)
    n_sched = stages * args.steps_per_stage
    over = dict(parse_set(args.sets))
    over.update({
        "schedule.num_scheduled_iterations": n_sched,
        "schedule.num_extension_iterations": 0,
        "eval.val_loss_every": 0,
        "eval.val_tokens": base.eval.val_batch_size,
        "runtime.log_every": 1,
    })
    cfg = load_config(args.preset, over)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(over, fh)
        cfg_file = fh.name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "trainer.train", "--preset", args.preset, "--config", cfg_file]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    # stream the JSON lines to --out as they come, so a run cut off by a time limit leaves its log
    out = open(args.out, "w") if args.out else None
    events = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy()) as proc:
        for line in proc.stdout:
            if out:
                out.write(line)
                out.flush()
            if line.startswith("{"):
                events.append(json.loads(line))
    if out:
        out.close()
    end = next((e for e in events if e["event"] == "end"), None)
    if proc.returncode != 0 or end is None:
        err = next((e for e in events if e["event"] == "error"), None)
        print(f"trainer failed (exit {proc.returncode}): {err}", file=sys.stderr)
        return 1
    steps = [e for e in events if e["event"] == "step"]
    print(f"preset={args.preset} world_size={args.nproc} steps/stage={args.steps_per_stage} "
          f"compile_s={end['compile_s']:.1f} warmup_s={end['warmup_s']:.1f} peak_mem_mib={end['peak_mem_mib']:.0f}")
    print(f"{'stage':>5} {'tokens/step':>11} {'window':>6} {'ms/step':>8} {'tokens/s':>11} {'TFLOP/s/GPU':>11} {'MFU':>6}")
    sch = cfg.schedule
    for k, bs in enumerate(sch.train_bs_schedule):
        lo, hi = k * args.steps_per_stage, (k + 1) * args.steps_per_stage
        ms = [e["step_ms"] for e in steps if lo + 5 < e["step"] <= hi]
        if not ms:
            continue
        med = statistics.median(ms)
        ws = sch.ws_schedule[min(len(sch.ws_schedule) - 1, k * len(sch.ws_schedule) // stages)]
        tps = bs / (med / 1000)
        tflops = tps * flops_per_token(cfg, ws) / 1e12 / args.nproc  # per GPU
        print(f"{k:>5} {bs:>11} {ws:>6} {med:>8.2f} {tps:>11.0f} {tflops:>11.1f} {tflops / args.peak_tflops:>6.1%}")
    print(f"final_val_loss={end['final_val_loss']:.4f} train_time_ms={end['train_time_ms']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

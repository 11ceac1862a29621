"""Same-machine A/B of one batch stage's step time: config variants built in one process, timed in turns.

    python benchmarks/ab_step.py --preset speedrun --stage 2 --set data.data_dir=/tmp/data/speedrun \
        --set data.synthetic=false --variant "" --variant "model.fused_qkv=true" [--rounds 6] [--steps 5]

Why: two H200s ran the same code ~2 % apart (docs/performance.md, session 7), and the effects being
timed are 1-2 %, so variants must be compared on one machine at one time. Each variant is the preset
plus the common --set overrides plus its own comma-separated `key=value` list ("" = the preset as is).
Every variant is built as the trainer builds a run (world size 1, compiled, CUDA graphs as configured)
and warmed up with 4 steps at the stage's (window, batch); then `--rounds` rounds, each timing
`--steps` optimizer steps of every variant with CUDA events, the order reversed every other round
(A B, B A, ...) so that drift of the machine falls on all alike. Prints per variant the median ms/step
over the rounds and, against the first variant, the median of the per-round ratios with their range.
Every variant keeps its model, optimizer state and graphs on the GPU at once (about 30 GiB each at the
speedrun's 393k stage). GPU only; the cost is one compile per variant (~50 s at the speedrun's stage 2).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_variant(text: str) -> list[str]:
    """'a.b=1,c.d=x' → ['a.b=1', 'c.d=x'] (the --set form); '' → []. A value with a comma cannot be
    given here (use the common --set)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for p in parts:
        if "=" not in p:
            raise SystemExit(f"error: --variant {text!r}: {p!r} is not key=value (e.g. model.fused_qkv=true)")
    return parts


def summarize(times: dict[str, list[float]]) -> list[tuple[str, float, float, float, float]]:
    """Per variant (in the given order): (name, median ms/step, median ratio to the first variant,
    lowest and highest per-round ratio). Rounds pair up by position."""
    names = list(times)
    base = times[names[0]]
    rows = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], base, strict=True)]
        rows.append((name, statistics.median(times[name]), statistics.median(ratios), min(ratios), max(ratios)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="speedrun")
    ap.add_argument("--stage", type=int, default=-1, help="index into the preset's (window, batch) stages")
    ap.add_argument("--variant", action="append", default=[], help="comma-separated key=value overrides; "
                    "give it once per variant, the first is the reference ('' = the preset)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per variant per round")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="overrides for every variant")
    args = ap.parse_args(argv)
    variants = args.variant or [""]
    if len(variants) < 2:
        ap.error("give at least two --variant (the first is the reference; '' is the preset itself)")

    import torch

    from profile_step import build_stage  # benchmarks/ (this script's directory is on sys.path)

    if not torch.cuda.is_available():
        print("error: ab_step.py times CUDA events: it needs a GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    runs = {}
    for text in variants:
        name = text or "(preset)"
        cfg, run, loader, step, win, bs, ga = build_stage(args.preset, args.sets + parse_variant(text),
                                                          args.stage, dev)
        for i in range(4):  # compile, capture, warm
            run.train_step(loader, step, i, window=win, bs=bs)
        torch.cuda.synchronize()
        runs[name] = (run, loader, step, win, bs)
        print(f"built {name}: backend={cfg.model.attn_backend} window={win[0]} batch={bs} grad_accum={ga}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    try:
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                run, loader, step, win, bs = runs[name]
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(args.steps):
                    run.train_step(loader, step, 4 + r * args.steps + i, window=win, bs=bs)
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / args.steps)
            print(f"round {r + 1}: " + "  ".join(f"{n} {times[n][-1]:.2f}" for n in order), flush=True)
    finally:
        for run, loader, *_ in runs.values():
            loader.close()
    print(f"\n{'variant':<44} {'ms/step':>9} {'ratio':>7} {'range':>15}")
    for name, med, ratio, lo, hi in summarize(times):
        print(f"{name:<44} {med:9.2f} {ratio:7.4f} {lo:7.4f}–{hi:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one training step's GPU time goes: torch.profiler over a few steps of one batch stage.

    python benchmarks/profile_step.py --preset speedrun --stage 2 --set data.data_dir=/tmp/data/speedrun \
        --set data.synthetic=false [--steps 3] [--top 40] [--trace OUT.json]

Builds the run in-process (world size 1, the stage's real shapes), compiles and warms the stage,
profiles --steps optimizer steps and prints the kernels grouped by name, largest first: total ms
per step, share, calls per step, and a coarse class (matmul, attention, optimizer, norm/elementwise,
cross-entropy, embedding, copy/other) with the per-class totals; then how busy the GPU was (kernel
time over step time: well under 100 % means the host or a sync holds it up) and, with --cpu-top N,
the host-side ops that cost the most CPU time. GPU only.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = [
    ("attention", r"flash|flex|attn|FlashAttn|fmha|sdpa|_attention"),
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|matmul|_scaled_mm|wgmma|mm_|bmm|Kernel2"),
    ("optimizer", r"polar|newton|adam|normuon|foreach|multi_tensor"),
    ("cross-entropy", r"log_softmax|nll|cross_entropy|softmax"),
    ("embedding", r"embedding|index_add|indexing_backward|scatter|gather|index_put"),
    ("copy/other", r"copy|memcpy|memset|fill|cat|elementwise_kernel|vectorized"),
    ("inductor fused", r"triton_"),
]


def classify(name: str) -> str:
    for cls, pat in CLASSES:
        if re.search(pat, name, re.I):
            return cls
    return "other"


def build_stage(preset: str, sets: list[str], stage: int, dev):
    """One run of `preset` + `sets` built as the trainer builds it (world size 1) and a loader, at batch
    stage `stage`: (cfg, run, loader, first step of the stage, (long, short) window, batch tokens,
    grad_accum). Shared with benchmarks/ab_step.py."""
    from trainer.config import parse_set
    from trainer.data import ensure_data
    from trainer.presets import load_config
    from trainer.schedule import batch_tokens, short_window, stages, window_blocks
    from trainer.train import _build, _loader, check_run, resolve_backend, synth_kwargs

    cfg = resolve_backend(load_config(preset, parse_set(sets)), dev)
    grad_accum = check_run(cfg, 1, dev)
    d = cfg.data
    train_files, val_files = ensure_data(d.data_dir, train_pattern=d.train_pattern, val_pattern=d.val_pattern,
                                         synthetic=d.synthetic, synth=synth_kwargs(cfg))
    run = _build(cfg, dev, 0, 1, grad_accum, val_files)
    s = cfg.schedule
    long, bs = stages(s)[stage]
    step = next(i for i in range(s.num_iterations) if window_blocks(s, i)[0] == long and batch_tokens(s, i) == bs)
    return cfg, run, _loader(cfg, train_files, 0, 1), step, (long, short_window(s, long)), bs, grad_accum


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="speedrun")
    ap.add_argument("--stage", type=int, default=-1, help="index into the preset's (window, batch) stages")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--trace", default="", help="also write a Chrome trace here")
    ap.add_argument("--cpu-top", type=int, default=0, help="also list the N host-side ops with the most self CPU time")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args(argv)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    cfg, run, loader, step, win, bs, grad_accum = build_stage(args.preset, args.sets, args.stage, dev)
    print(f"preset={args.preset} backend={cfg.model.attn_backend} stage={args.stage} window={win[0]} batch={bs} "
          f"grad_accum={grad_accum}", flush=True)
    for i in range(4):  # compile + warm
        run.train_step(loader, step, i, window=win, bs=bs)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(args.steps):
            run.train_step(loader, step, i, window=win, bs=bs)
        end.record()
        torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / args.steps
    loader.close()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and t > 0:
            per[ev.key][0] += t / 1000 / args.steps
            per[ev.key][1] += ev.count / args.steps
    total = sum(v[0] for v in per.values())
    print(f"step {step_ms:.1f} ms (events); kernels {total:.1f} ms/step")
    by_cls = defaultdict(float)
    for k, (ms, _) in per.items():
        by_cls[classify(k)] += ms
    for c, ms in sorted(by_cls.items(), key=lambda kv: -kv[1]):
        print(f"  {c:>16}: {ms:8.1f} ms  {ms / total:6.1%}")
    print(f"{'ms/step':>8} {'share':>6} {'calls':>6}  {'class':>14}  kernel")
    for k, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{ms:8.2f} {ms / total:6.1%} {n:6.0f}  {classify(k):>14}  {k[:150]}")
    print(f"GPU busy {total / step_ms:.1%} of the step (the rest: the GPU waits, for the host or a sync)")
    if args.cpu_top:
        host = [ev for ev in prof.key_averages() if ev.device_type == torch.autograd.DeviceType.CPU]
        print(f"host ops by self CPU time, ms/step (all host ops: "
              f"{sum(ev.self_cpu_time_total for ev in host) / 1000 / args.steps:.1f} ms/step)")
        for ev in sorted(host, key=lambda e: -e.self_cpu_time_total)[:args.cpu_top]:
            ms_per = 1000 * args.steps
            print(f"{ev.self_cpu_time_total / ms_per:8.2f} self {ev.cpu_time_total / ms_per:8.2f} total "
                  f"{ev.count / args.steps:6.0f} calls  {ev.key[:120]}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())

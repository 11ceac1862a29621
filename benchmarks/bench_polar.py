"""Time Polar Express with the Triton symmetric kernels vs plain torch matmuls, speedrun shapes.

    python benchmarks/bench_polar.py                 # on a CUDA machine
    python benchmarks/bench_polar.py --dim 768 --iters 50 --json

Shapes (per rank on 8 GPUs, bf16): a chunk of 2 attention weights as 8 blocks of 768×768; a chunk
of 2 MLP weights 3072×768 (tall, handled as 768×3072); the 10 attention gates 6×12. Prints the
mean milliseconds per polar_express call of each backend and the speed-up torch/triton.
On a machine without CUDA or Triton it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def shapes(dim: int) -> dict[str, tuple[int, ...]]:
    return {
        "attn 2x4 blocks": (8, dim, dim),  # one rank's chunk on 8 GPUs
        "mlp 2 tall": (2, 4 * dim, dim),
        "attn gates": (10, 6, 12),
        "attn 10x4 blocks (1 GPU)": (40, dim, dim),  # the whole attention group on one rank
        "mlp 22 tall (1 GPU)": (22, 4 * dim, dim),  # all c_fc + c_proj on one rank
    }


def time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=768, help="model dim (768 in the speedrun)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per shape and backend")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls first (Triton compiles here)")
    ap.add_argument("--json", action="store_true", help="one JSON object per shape instead of a table")
    args = ap.parse_args(argv)

    from trainer import triton_polar
    from trainer.polar import polar_express

    if not torch.cuda.is_available() or not triton_polar.available():
        print("bench_polar needs a CUDA GPU with triton; nothing to time here.")
        return 0
    torch.manual_seed(0)
    rows = []
    for name, shape in shapes(args.dim).items():
        G = torch.randn(shape, device="cuda")
        a = polar_express(G, backend="triton")
        b = polar_express(G, backend="torch")
        diff = ((a.float() - b.float()).norm() / b.float().norm()).item()
        t_triton = time_ms(lambda: polar_express(G, backend="triton"), args.iters, args.warmup)
        t_torch = time_ms(lambda: polar_express(G, backend="torch"), args.iters, args.warmup)
        rows.append({"shape": name, "dims": list(shape), "triton_ms": round(t_triton, 4),
                     "torch_ms": round(t_torch, 4), "speedup": round(t_torch / t_triton, 3),
                     "rel_diff": float(f"{diff:.3g}")})
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
        print(f"{'shape':<18}{'dims':<20}{'triton ms':>11}{'torch ms':>11}{'speed-up':>10}{'rel diff':>10}")
        for r in rows:
            print(f"{r['shape']:<18}{str(tuple(r['dims'])):<20}{r['triton_ms']:>11.3f}{r['torch_ms']:>11.3f}"
                  f"{r['speedup']:>9.2f}x{r['rel_diff']:>10.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the flex BlockMask construction compile (Inductor, fullgraph) at every speedrun shape? GPU only.

    python benchmarks/gpu_mask_check.py [--blocks 128 256 384 2048] [--variants scatter2d sort ...]

Found by the GPU runs: the first sort-free construction (cumsum + scatter along dim -1) failed
Inductor's Triton codegen from 256 blocks on ("list indices must be integers or slices, not NoneType" in
get_block_shape, a [256, 256] int32 Scatter) — the speedrun preset's second batch stage. This
compiles each construction variant alone for each size, compares it with eager, and prints one
line per (variant, size): ok / FAIL and the compile time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import attention as A  # noqa: E402


def _ordered_sort(mask):
    num = mask.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort(mask.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _ordered_scatter2d(mask):  # the first sort-free version (session 2): scatter along dim -1
    m = mask.to(torch.int32)
    num = m.sum(dim=-1, dtype=torch.int32)
    pos_true = torch.cumsum(m, dim=-1) - 1
    pos_false = num[..., None] + torch.cumsum(1 - m, dim=-1) - 1
    dest = torch.where(mask, pos_true, pos_false).long()
    cols = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32).expand_as(m)
    idx = torch.empty_like(m).scatter_(-1, dest, cols)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _ordered_scatter1d(mask):  # the same scatter over the flattened matrix (tried in session 3)
    m = mask.to(torch.int32)
    rows, n = m.shape
    num = m.sum(dim=-1, dtype=torch.int32)
    pos_true = torch.cumsum(m, dim=-1) - 1
    pos_false = num[..., None] + torch.cumsum(1 - m, dim=-1) - 1
    row0 = torch.arange(rows, device=mask.device, dtype=torch.int64)[:, None] * n
    dest = (torch.where(mask, pos_true, pos_false).long() + row0).reshape(-1)
    cols = torch.arange(n, device=mask.device, dtype=torch.int32).expand(rows, n).reshape(-1)
    idx = torch.empty(rows * n, device=mask.device, dtype=torch.int32).scatter_(0, dest, cols).view(rows, n)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def build(docs, window, ordered, contiguous_t: bool):
    any_, full = A.block_classes(docs, window, A.MASK_BLOCK)
    partial = any_ & ~full
    pt, ft = partial.transpose(0, 1), full.transpose(0, 1)
    if contiguous_t:
        pt, ft = pt.contiguous(), ft.contiguous()
    return (*ordered(partial), *ordered(full), *ordered(pt), *ordered(ft))


VARIANTS = {  # the rows of the table in docs/performance.md ("Cold compile")
    "scatter2d": lambda d, w: build(d, w, _ordered_scatter2d, False),
    "scatter2d+contig": lambda d, w: build(d, w, _ordered_scatter2d, True),  # transposed inputs made contiguous
    "scatter1d": lambda d, w: build(d, w, _ordered_scatter1d, False),
    "sort": lambda d, w: build(d, w, _ordered_sort, False),
    "searchsorted": lambda d, w: build(d, w, A._ordered, False),  # what trainer/attention.py does now
}


def docs_for(n_blocks: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(n_blocks)
    lens = torch.randint(50, 3000, (n_blocks * 128 // 50,), generator=g)
    docs = torch.repeat_interleave(torch.arange(len(lens)), lens)[: n_blocks * A.MASK_BLOCK]
    return docs.to(device=device, dtype=torch.int32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 384, 2048])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    bad = 0
    for name in args.variants:
        fn = VARIANTS[name]
        cfn = torch.compile(fn, dynamic=False, fullgraph=True)
        for nb in args.blocks:
            docs = docs_for(nb, dev)
            w = torch.tensor(1792, device=dev, dtype=torch.int32)
            t0 = time.perf_counter()
            try:
                got = cfn(docs, w)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                want = fn(docs, w)
                same = all(torch.equal(a, b) for a, b in zip(got, want))
                status = "ok" if same else "WRONG"
            except Exception as e:  # noqa: BLE001
                status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:150]}"
            bad += status != "ok"
            print(f"{name:>15} blocks={nb:4d}: {status}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

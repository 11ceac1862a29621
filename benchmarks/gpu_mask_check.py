"""Does the flex BlockMask construction compile (Inductor, fullgraph) at every block count, and list
exactly the blocks of the dense reference? GPU only.

    python benchmarks/gpu_mask_check.py                        # trainer's construction, 1 … 2048 blocks
    python benchmarks/gpu_mask_check.py --variants spans searchsorted --blocks 32 64 128

History (docs/performance.md): an in-graph argsort compiled into multi-MB Triton kernels (the
longest pole of a cold compile); the cumsum + scatter that replaced it failed Inductor's Triton
codegen from 256 blocks on; the cumsum + searchsorted after it failed at 32, 64 and 96 blocks
("Loop-carried variable low has initial type <['1','32'], int64> but is re-assigned to
<['32','32'], int64>"), which broke every `small`-preset run (64-block micro-batches). The
trainer now builds each row's block list by index arithmetic (`spans`: trainer.attention.
block_spans). For each (variant, block count) this compiles the construction alone with random
document layouts and a 0-d tensor window, compares every count and listed block of both
orientations with the dense reference (trainer.attention.block_classes, eager) and prints one
line: ok / WRONG / FAIL and the compile time. Exit 1 if any line is not ok.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import attention as A  # noqa: E402

BLOCKS = [1, 2, 3, 16, 32, 64, 96, 128, 256, 384, 2048]


def _ordered_searchsorted(mask):  # session 3's construction (main 433bc4c … 18186ad)
    m = mask.to(torch.int32)
    n = m.shape[-1]
    num = m.sum(dim=-1, dtype=torch.int32)
    slot = torch.arange(n, device=mask.device, dtype=torch.int32).expand_as(m)
    col_true = torch.searchsorted(torch.cumsum(m, dim=-1), (slot + 1).contiguous(), side="left")
    col_false = torch.searchsorted(torch.cumsum(1 - m, dim=-1), (slot - num[:, None] + 1).contiguous(), side="left")
    idx = torch.where(slot < num[:, None], col_true, col_false).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _ordered_sort(mask):  # session 1's construction
    num = mask.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort(mask.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def _from_classes(ordered):
    def build(docs, window):
        any_, full = A.block_classes(docs, window, A.MASK_BLOCK)
        partial = any_ & ~full
        out = {}
        for key, m in (("kv", partial), ("full_kv", full), ("q", partial.T), ("full_q", full.T)):
            out[f"{key}_num_blocks"], out[f"{key}_indices"] = ordered(m)
        return out
    return build


VARIANTS = {
    "spans": lambda docs, window: A.block_spans(docs, window, A.MASK_BLOCK),  # what the trainer does now
    "searchsorted": _from_classes(_ordered_searchsorted),
    "sort": _from_classes(_ordered_sort),
}


def docs_for(n_blocks: int, seed: int, device) -> torch.Tensor:
    """Document ids for n_blocks × 128 tokens: lengths 1 … 3000 (many documents per block and
    documents spanning many blocks), the records' training layout."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 3000, (n_blocks * A.MASK_BLOCK + 1,), generator=g)
    docs = torch.repeat_interleave(torch.arange(len(lens)), lens)[: n_blocks * A.MASK_BLOCK]
    return docs.to(device=device, dtype=torch.int32)


def listed(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The (n, n) bool matrix of the blocks a (count, indices) pair lists (vectorised)."""
    num, idx = num[0, 0].long(), idx[0, 0].long()
    n = num.numel()
    keep = torch.arange(idx.shape[-1], device=idx.device)[None, :] < num[:, None]
    out = torch.zeros(n, n, dtype=torch.int32, device=idx.device)
    out.scatter_add_(1, idx.clamp(0, n - 1), keep.int())
    if int(out.max()) > 1:
        return out  # a repeated block: compare fails below
    return out.bool()


def check(got: dict, docs: torch.Tensor, window: int) -> str:
    any_, full = A.block_classes(docs, window, A.MASK_BLOCK)
    partial = any_ & ~full
    want = {"kv": partial, "full_kv": full, "q": partial.T, "full_q": full.T}
    for key, ref in want.items():
        m = listed(got[f"{key}_num_blocks"], got[f"{key}_indices"])
        if m.dtype != torch.bool or not torch.equal(m, ref):
            return f"WRONG ({key})"
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=BLOCKS)
    ap.add_argument("--variants", nargs="+", default=["spans"], choices=list(VARIANTS))
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 384, 1792, 2560])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch._dynamo.config.recompile_limit = 64  # one graph per block count
    bad = 0
    for name in args.variants:
        fn = VARIANTS[name]
        cfn = torch.compile(fn, dynamic=False, fullgraph=True)
        for nb in args.blocks:
            t0 = time.perf_counter()
            status = "ok"
            try:
                for k, w in enumerate(args.windows):  # one compile per size: the window is a tensor
                    docs = docs_for(nb, seed=nb * 10 + k, device=dev)
                    got = cfn(docs, torch.tensor(w, device=dev, dtype=torch.int32))
                    status = check(got, docs, w)
                    if status != "ok":
                        status += f" window={w}"
                        break
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
            bad += status != "ok"
            print(f"{name:>13} blocks={nb:4d}: {status}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

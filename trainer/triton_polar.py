"""Triton kernels for the two symmetric products of Polar Express (GPU only).

    A = X·Xᵀ          xxt(X)               X: (B, m, n)  →  A: (B, m, m)
    C = b·A + c·A·A   ba_plus_caa(A, b, c) A: (B, m, m) symmetric  →  C: (B, m, m)

Both outputs are symmetric, so each kernel runs one program per (batch, tile pair (i, j) with
i ≤ j): it computes output tile (i, j) with `tl.dot` over the shared dimension, stores it, and
stores its transpose at tile (j, i). That is about half the FLOPs of a plain matmul. Sizes need
not be multiples of the tile: loads and stores are masked.

Importing this module never fails: Triton is imported on first use. `available()` says whether
the kernels can run here (CUDA device + importable triton).

    python -m pytest tests/trainer/test_polar_gpu.py -q     # on a GPU machine
    python benchmarks/bench_polar.py
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

_KERNELS: dict[str, object] = {}
triton = None  # set by _build(): the kernels below look `triton` / `tl` up in this module's globals
tl = None


@functools.lru_cache(maxsize=1)
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on a CPU-only box
        return False
    return True


def available() -> bool:
    """True when a CUDA device is present and triton imports."""
    return torch.cuda.is_available() and _triton_ok()


def _build() -> dict[str, object]:
    """Define the @triton.jit kernels (once, on first use)."""
    global triton, tl
    if _KERNELS:
        return _KERNELS
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl

    @triton.jit
    def _xxt_kernel(X, A, PAIRS, M, K,
                    sxb, sxm, sxk, sab, sam, san,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_p = tl.program_id(1)
        ti = tl.load(PAIRS + 2 * pid_p)
        tj = tl.load(PAIRS + 2 * pid_p + 1)
        rm = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        xb = X + pid_b.to(tl.int64) * sxb
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            # rows rm of X: (BLOCK_M, BLOCK_K); rows rn of X read transposed: (BLOCK_K, BLOCK_M)
            a = tl.load(xb + rm[:, None] * sxm + kk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            bt = tl.load(xb + rn[None, :] * sxm + kk[:, None] * sxk,
                         mask=(rn[None, :] < M) & (kk[:, None] < K), other=0.0)
            if IEEE:
                acc = tl.dot(a, bt, acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(a, bt, acc=acc)
        out = acc.to(A.dtype.element_ty)
        ab = A + pid_b.to(tl.int64) * sab
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        tl.store(ab + rm[:, None] * sam + rn[None, :] * san, out, mask=mask)
        if ti != tj:  # mirror: tile (j, i) = tile (i, j)ᵀ
            mask_t = (rn[:, None] < M) & (rm[None, :] < M)
            tl.store(ab + rn[:, None] * sam + rm[None, :] * san, tl.trans(out), mask=mask_t)

    @triton.jit
    def _ba_plus_caa_kernel(A, C, PAIRS, M, beta, alpha,
                            sab, sam, san, scb, scm, scn,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_p = tl.program_id(1)
        ti = tl.load(PAIRS + 2 * pid_p)
        tj = tl.load(PAIRS + 2 * pid_p + 1)
        rm = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        ab = A + pid_b.to(tl.int64) * sab
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            kk = k0 + rk
            left = tl.load(ab + rm[:, None] * sam + kk[None, :] * san,
                           mask=(rm[:, None] < M) & (kk[None, :] < M), other=0.0)
            right = tl.load(ab + kk[:, None] * sam + rn[None, :] * san,
                            mask=(kk[:, None] < M) & (rn[None, :] < M), other=0.0)
            if IEEE:
                acc = tl.dot(left, right, acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(left, right, acc=acc)
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        a_ij = tl.load(ab + rm[:, None] * sam + rn[None, :] * san, mask=mask, other=0.0)
        out = (alpha * acc + beta * a_ij.to(tl.float32)).to(C.dtype.element_ty)
        cb = C + pid_b.to(tl.int64) * scb
        tl.store(cb + rm[:, None] * scm + rn[None, :] * scn, out, mask=mask)
        if ti != tj:
            mask_t = (rn[:, None] < M) & (rm[None, :] < M)
            tl.store(cb + rn[:, None] * scm + rm[None, :] * scn, tl.trans(out), mask=mask_t)

    _KERNELS["xxt"] = _xxt_kernel
    _KERNELS["ba_plus_caa"] = _ba_plus_caa_kernel
    return _KERNELS


_PAIRS: dict[tuple[int, str], Tensor] = {}


def _pairs(tiles: int, device: torch.device) -> Tensor:
    """int32 (P, 2) table of upper-triangular tile pairs (i ≤ j), P = tiles·(tiles+1)/2; cached."""
    key = (tiles, str(device))
    t = _PAIRS.get(key)
    if t is None:
        idx = [(i, j) for i in range(tiles) for j in range(i, tiles)]
        t = torch.tensor(idx, dtype=torch.int32).to(device)
        _PAIRS[key] = t
    return t


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _blocks(m: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) for an m×m output over a k-long reduction."""
    block_m = max(16, min(128, _next_pow2(m)))
    cap_k = 64 if dtype.itemsize <= 2 else 32  # fp32 tiles take twice the shared memory
    block_k = max(16, min(cap_k, _next_pow2(k)))
    warps = 8 if block_m >= 128 else 4
    stages = 3 if block_m >= 64 else 2
    return block_m, block_k, warps, stages


def _check(x: Tensor, name: str) -> None:
    if not x.is_cuda:
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor (got device {x.device}); "
                         "use trainer.polar.polar_express(..., backend='torch') on CPU")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected a batched (B, m, n) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: dtype {x.dtype} unsupported; use bfloat16, float16 or float32")
    if not _triton_ok():
        raise ValueError(f"{name}: triton is not importable here; use backend='torch'")


def xxt(X: Tensor) -> Tensor:
    """A = X·Xᵀ for X of shape (B, m, n), in X's dtype; one triangle of tiles computed, then mirrored."""
    _check(X, "xxt")
    kern = _build()["xxt"]
    bsz, m, k = X.shape
    A = torch.empty((bsz, m, m), device=X.device, dtype=X.dtype)
    if bsz == 0 or m == 0:
        return A
    if k == 0:
        return A.zero_()
    bm, bk, warps, stages = _blocks(m, k, X.dtype)
    tiles = (m + bm - 1) // bm
    pairs = _pairs(tiles, X.device)
    grid = (bsz, pairs.shape[0])
    kern[grid](X, A, pairs, m, k,
               X.stride(0), X.stride(1), X.stride(2), A.stride(0), A.stride(1), A.stride(2),
               BLOCK_M=bm, BLOCK_K=bk, IEEE=X.dtype == torch.float32,
               num_warps=warps, num_stages=stages)
    return A


def ba_plus_caa(A: Tensor, b: float, c: float) -> Tensor:
    """b·A + c·A·A for symmetric A of shape (B, m, m), in A's dtype (fp32 accumulation)."""
    _check(A, "ba_plus_caa")
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"ba_plus_caa: A must be square (B, m, m), got shape {tuple(A.shape)}")
    kern = _build()["ba_plus_caa"]
    bsz, m, _ = A.shape
    C = torch.empty_like(A, memory_format=torch.contiguous_format)
    if bsz == 0 or m == 0:
        return C
    bm, bk, warps, stages = _blocks(m, m, A.dtype)
    tiles = (m + bm - 1) // bm
    pairs = _pairs(tiles, A.device)
    grid = (bsz, pairs.shape[0])
    kern[grid](A, C, pairs, m, float(b), float(c),
               A.stride(0), A.stride(1), A.stride(2), C.stride(0), C.stride(1), C.stride(2),
               BLOCK_M=bm, BLOCK_K=bk, IEEE=A.dtype == torch.float32,
               num_warps=warps, num_stages=stages)
    return C


__all__ = ["available", "xxt", "ba_plus_caa"]

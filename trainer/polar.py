"""Polar Express: a fixed 5-step polynomial approximation of the polar factor U·Vᵀ of a matrix.

Amsel, Persson, Musco and Gower, arXiv 2505.16932; the coefficients are those of the speedrun
("num_iters=5, safety_factor=2e-2, cushion=2"), identical in the 10-27 and 12-11 records.

    from trainer.polar import polar_express
    V = polar_express(G)                     # G: (..., m, n); V ≈ U·Vᵀ of each matrix, in bf16
    python -m pytest tests/trainer/test_polar.py -q

Each step, on the wide orientation X (m ≤ n):  A = X·Xᵀ;  B = b·A + c·A·A;  X ← a·X + B·X.
A and B are symmetric, so the Triton backend (trainer/triton_polar.py) computes one triangle
of their output tiles and mirrors it; the torch backend uses plain batched matmuls.
"""
from __future__ import annotations

import torch
from torch import Tensor

POLAR_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SAFETY = 0.02  # input divided by ‖X‖_F·(1 + SAFETY) + EPS so that the spectral norm is < 1
EPS = 1e-6
BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, G: Tensor) -> str:
    """'auto' → 'triton' iff G is on CUDA and Triton imports, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"polar_express backend={backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    from trainer import triton_polar

    usable = G.is_cuda and triton_polar.available()
    if backend == "triton" and not usable:
        raise ValueError("polar_express backend='triton' needs a CUDA tensor and an importable "
                         "triton; use backend='torch' (optim.muon.polar_backend=torch) or 'auto'")
    return "triton" if usable else "torch"


def polar_express(G: Tensor, iters: int = 5, backend: str = "auto", dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate polar factor of each matrix in G (..., m, n), computed and returned in `dtype`."""
    if G.dim() < 2:
        raise ValueError(f"polar_express needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    if not 1 <= iters <= len(POLAR_COEFFS):
        raise ValueError(f"polar_express iters={iters} is invalid: must be in 1..{len(POLAR_COEFFS)}")
    kind = resolve_backend(backend, G)
    lead, (m, n) = G.shape[:-2], G.shape[-2:]
    if G.numel() == 0:
        return G.to(dtype)
    tall = m > n
    X = G.reshape(-1, m, n).to(dtype)
    if tall:
        X = X.mT
    # Frobenius norm in fp32 whatever the compute dtype, then back to `dtype`.
    norm = X.float().norm(dim=(-2, -1), keepdim=True)
    X = (X.float() / (norm * (1.0 + SAFETY) + EPS)).to(dtype).contiguous()
    if kind == "triton":
        from trainer.triton_polar import ba_plus_caa, xxt

        for a, b, c in POLAR_COEFFS[:iters]:
            A = xxt(X)
            B = ba_plus_caa(A, b, c)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    else:
        for a, b, c in POLAR_COEFFS[:iters]:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if tall:
        X = X.mT
    return X.reshape(*lead, m, n)


__all__ = ["POLAR_COEFFS", "polar_express", "resolve_backend"]

"""Polar Express: a fixed-step polynomial approximation of the polar factor U·Vᵀ of a matrix.

Amsel, Persson, Musco and Gower, arXiv 2505.16932. The records' 5 steps are their comment's
"num_iters=5, safety_factor=2e-2, cushion=2" (cushion 0.02): `derive_coefficients(5)` reproduces
them to 1e-14. The 4- and 3-step sets are derived the same way (`optim.muon.polar_coeffs`). They
are not the first 4 or 3 record steps: the construction divides x by the safety factor 1.02 in
every step but the last, so a k-step set is the first k − 1 record steps plus record step k with
that factor undone, whose output is centred on 1 (truncating the list keeps the 1.02 and lands
low). The difference is small; an ablation of the step count should still use the right set.

    from trainer.polar import polar_express, POLAR_SETS
    V = polar_express(G)                     # G: (..., m, n); V ≈ U·Vᵀ of each matrix, in bf16
    V = polar_express(G, coeffs=POLAR_SETS["pe-4"])
    python -m trainer.polar                  # re-derive and print every named set
    python -m pytest tests/trainer/test_polar.py -q

Each step, on the wide orientation X (m ≤ n):  A = X·Xᵀ;  B = b·A + c·A·A;  X ← a·X + B·X.
A and B are symmetric, so the Triton backend (trainer/triton_polar.py) computes one triangle
of their output tiles and mirrors it; the torch backend uses plain batched matmuls.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

Coeffs = tuple[tuple[float, float, float], ...]

# The records' list, as printed in both train_gpt.py files (10-27 and 12-11).
POLAR_COEFFS: Coeffs = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Named sets for optim.muon.polar_coeffs. The greedy construction makes step t depend only on
# steps < t, so a k-step set shares its first k − 1 steps with the records' list (taken from it
# verbatim) and differs in its last step, derive_coefficients(k)[-1], frozen here so that a run's
# numbers never depend on numpy's solver (tests/trainer/test_polar.py re-derives every set).
POLAR_SETS: dict[str, Coeffs] = {
    "record-5": POLAR_COEFFS,
    "pe-4": POLAR_COEFFS[:3] + ((3.351468730910768, -2.5130779633710483, 0.5128347598303034),),
    "pe-3": POLAR_COEFFS[:2] + ((3.969501158338514, -2.9421823632678334, 0.5587364505634643),),
}
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


def polar_express(G: Tensor, coeffs: Sequence[tuple[float, float, float]] = POLAR_COEFFS, backend: str = "auto",
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate polar factor of each matrix in G (..., m, n), computed and returned in `dtype`,
    by one odd quintic step X ← a·X + b·X³ + c·X⁵ (matrix powers) per (a, b, c) in `coeffs`."""
    if G.dim() < 2:
        raise ValueError(f"polar_express needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    if not coeffs or any(len(t) != 3 for t in coeffs):
        raise ValueError(f"polar_express coeffs={coeffs!r} is invalid: a non-empty list of (a, b, c) "
                         f"triples, e.g. trainer.polar.POLAR_SETS[{next(iter(POLAR_SETS))!r}]")
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

        for a, b, c in coeffs:
            A = xxt(X)
            B = ba_plus_caa(A, b, c)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    else:
        for a, b, c in coeffs:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if tall:
        X = X.mT
    return X.reshape(*lead, m, n)


# --------------------------------------------------------------------------------------------
# Deriving coefficient sets (Amsel et al. 2025, §4: greedy composition of optimal odd quintics)
# --------------------------------------------------------------------------------------------
def _best_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """The odd quintic p(x) = a·x + b·x³ + c·x⁵ minimizing max |1 − p(x)| over [lo, hi].

    By equioscillation the error alternates sign at lo, at p's two interior extrema q < r and at
    hi. Remez exchange: solve the 4×4 linear system p(x_i) + (−1)^i·E = 1 for (a, b, c, E) at
    x = (lo, q, r, hi), move q and r to the roots of p'(x) = a + 3b·x² + 5c·x⁴, repeat until E
    stops changing. For a degenerate interval the limit is the Newton-Schulz-like quintic of 1."""
    import numpy as np

    if lo / hi >= 1 - 5e-6:
        return 15 / 8 / hi, -10 / 8 / hi ** 3, 3 / 8 / hi ** 5
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err, prev = math.inf, None
    while prev is None or abs(prev - err) > 1e-15:
        prev = err
        xs = np.array([lo, q, r, hi])
        system = np.stack([xs, xs ** 3, xs ** 5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, err = np.linalg.solve(system, np.ones(4))
        disc = math.sqrt(9 * b * b - 20 * a * c)
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
    return float(a), float(b), float(c)


def derive_coefficients(num_iters: int, lower: float = 1e-3, safety: float = 2e-2,
                        cushion: float = 0.02) -> Coeffs:
    """The Polar Express schedule of `num_iters` quintics for singular values in [lower, 1].

    Step t takes the current interval [l, u] (u = 2 − l after the first step), fits the optimal
    quintic on [max(l, cushion·u), u], rescales it so that p(l) and p(u) straddle 1 symmetrically
    when the cushion cut the interval, and (all steps but the last) divides x by 1 + safety, i.e.
    (a, b, c) / (s, s³, s⁵). With the defaults (the records' "num_iters=5, safety_factor=2e-2,
    cushion=2") derive_coefficients(5) equals POLAR_COEFFS to 1e-14."""
    if num_iters < 1:
        raise ValueError(f"num_iters={num_iters} is invalid: must be ≥ 1")
    if not 0 < lower <= 1 or safety < 0 or not 0 <= cushion < 1:
        raise ValueError(f"lower={lower}, safety={safety}, cushion={cushion} are invalid: need 0 < lower ≤ 1, "
                         "safety ≥ 0, 0 ≤ cushion < 1")
    lo, hi, s = lower, 1.0, 1.0 + safety
    out: list[tuple[float, float, float]] = []
    for t in range(num_iters):
        a, b, c = _best_quintic(max(lo, cushion * hi), hi)
        if cushion * hi > lo:
            p_lo, p_hi = a * lo + b * lo ** 3 + c * lo ** 5, a * hi + b * hi ** 3 + c * hi ** 5
            k = 2 / (p_lo + p_hi)
            a, b, c = a * k, b * k, c * k
        if t < num_iters - 1:
            a, b, c = a / s, b / s ** 3, c / s ** 5
        out.append((a, b, c))
        lo = a * lo + b * lo ** 3 + c * lo ** 5
        hi = 2 - lo
        lo = min(lo, hi)
    return tuple(out)


def coefficients(name: str) -> Coeffs:
    """The named set of optim.muon.polar_coeffs; ValueError listing the names otherwise."""
    try:
        return POLAR_SETS[name]
    except KeyError:
        raise ValueError(f"optim.muon.polar_coeffs={name!r} is invalid: choose one of {', '.join(POLAR_SETS)} "
                         "(other step counts: add a derive_coefficients(n) set to trainer/polar.py POLAR_SETS)") from None


__all__ = ["POLAR_COEFFS", "POLAR_SETS", "coefficients", "derive_coefficients", "polar_express", "resolve_backend"]

if __name__ == "__main__":
    for n in (5, 4, 3):
        print(f"{n} steps:", *derive_coefficients(n), sep="\n  ")

"""Polar Express against float64 references (CPU, torch backend).

    python -m pytest tests/trainer/test_polar.py -q

Two references:
* the exact polynomial the 5 fixed steps apply to each singular value, computed in float64 from
  an SVD (s ← a·s + b·s³ + c·s⁵ on s = σ/(‖G‖_F·1.02 + 1e-6)): this pins the coefficients, the
  normalization and the transposition down to rounding;
* the exact polar factor U·Vᵀ: Polar Express is an approximation with a safety margin, so this
  bound is loose by design (singular values land in about [0.86, 1.14]).
"""
from __future__ import annotations

import pytest
import torch

from trainer import triton_polar
from trainer.config import MuonConfig
from trainer.polar import POLAR_COEFFS, POLAR_SETS, coefficients, derive_coefficients, polar_express

SHAPES = [(3, 48, 96), (3, 96, 48), (2, 2, 64, 64), (1, 200, 72), (2, 96, 384)]  # wide, tall, square, batched


def poly_reference(G: torch.Tensor, coeffs=POLAR_COEFFS) -> torch.Tensor:
    """U·diag(p(σ))·Vᵀ in float64, p the composition of the odd quintics `coeffs`."""
    G = G.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = S / (G.norm(dim=(-2, -1)).unsqueeze(-1) * 1.02 + 1e-6)
    for a, b, c in coeffs:
        s = a * s + b * s ** 3 + c * s ** 5
    return (U * s.unsqueeze(-2)) @ Vh


def rel_err(X: torch.Tensor, R: torch.Tensor) -> float:
    return ((X.double() - R).norm(dim=(-2, -1)) / R.norm(dim=(-2, -1))).max().item()


def test_coefficients_are_the_records():
    assert len(POLAR_COEFFS) == 5
    assert POLAR_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert POLAR_COEFFS[-1] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("coeffs", [POLAR_COEFFS[:1], POLAR_SETS["pe-3"], POLAR_COEFFS], ids=["1", "pe-3", "record-5"])
def test_matches_polynomial_reference(shape, coeffs):
    """Measured worst relative Frobenius error vs the float64 polynomial over these shapes:
    fp32 path 4.2e-6 (asserted ≤ 2e-5); bf16 path 2.3e-2 (asserted ≤ 4e-2)."""
    torch.manual_seed(0)
    G = torch.randn(shape)
    R = poly_reference(G, coeffs)
    assert rel_err(polar_express(G, coeffs, backend="torch", dtype=torch.float32), R) < 2e-5
    assert rel_err(polar_express(G, coeffs, backend="torch", dtype=torch.bfloat16), R) < 4e-2


def test_derivation_reproduces_the_records_coefficients():
    """The Polar Express construction with the records' parameters (ℓ = 1e-3, safety 2e-2,
    cushion 0.02) gives the records' 5 tuples; the named 4- and 3-step sets are that construction
    with 4 and 3 steps. Each set shares all but its last step with the records' list."""
    for name, n in (("record-5", 5), ("pe-4", 4), ("pe-3", 3)):
        derived = derive_coefficients(n)
        assert len(POLAR_SETS[name]) == n
        for got, want in zip(derived, POLAR_SETS[name]):
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), name
        assert POLAR_SETS[name][:-1] == POLAR_COEFFS[:n - 1]
    # The last step of a shorter set is a different polynomial, not the record's step n.
    assert POLAR_SETS["pe-4"][-1][0] == pytest.approx(3.3514687, abs=1e-6)
    assert abs(POLAR_SETS["pe-4"][-1][0] - POLAR_COEFFS[3][0]) > 0.05
    # Other parameters give other coefficients (the test can fail).
    assert derive_coefficients(5, safety=1e-2)[0][0] != pytest.approx(POLAR_COEFFS[0][0], rel=1e-6)


@pytest.mark.parametrize("name", ["pe-4", "pe-3"])
def test_shorter_set_ends_without_the_safety_factor(name):
    """In the construction only the last step skips the safety factor: a k-step set is the first
    k − 1 record steps plus record step k with x ↦ 1.02·x undone, (a, b, c)·(1.02, 1.02³, 1.02⁵).
    Over singular values in [1e-3, 1]/1.02 that lands closer to 1 than the first k record steps."""
    k = len(POLAR_SETS[name])
    a, b, c = POLAR_COEFFS[k - 1]
    assert POLAR_SETS[name][-1] == pytest.approx((a * 1.02, b * 1.02 ** 3, c * 1.02 ** 5), rel=1e-12)
    s0 = torch.logspace(-3, 0, 2001, dtype=torch.float64) / 1.02

    def final(coeffs):
        s = s0.clone()
        for a, b, c in coeffs:
            s = a * s + b * s ** 3 + c * s ** 5
        return s

    derived, truncated = final(POLAR_SETS[name]), final(POLAR_COEFFS[:k])
    assert derived.min() > truncated.min() and (derived - 1).abs().max() < (truncated - 1).abs().max()


def test_config_names_every_set():
    """optim.muon.polar_coeffs accepts exactly the names of POLAR_SETS; others are refused."""
    import typing

    assert set(typing.get_args(typing.get_type_hints(MuonConfig)["polar_coeffs"])) == set(POLAR_SETS)
    with pytest.raises(ValueError, match="choose one of"):
        coefficients("pe-2")


def _conditioned(batch: int, m: int, n: int, cond: float) -> tuple[torch.Tensor, torch.Tensor]:
    """G = U·diag(s)·Vᵀ with s log-spaced from 1 to 1/cond; returns (G float32, U·Vᵀ float64)."""
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(batch, m, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, r, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
    return ((U * s) @ V.mT).float(), U @ V.mT


@pytest.mark.parametrize("m,n", [(64, 128), (128, 64), (96, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_exact_polar_factor(m, n, dtype):
    """Against U·Vᵀ from an SVD, condition number 100 (σ_min/‖G‖_F ≈ 1e-3): measured relative
    Frobenius error ≤ 0.094 (fp32) / 0.098 (bf16), singular values of the result in
    [0.857, 1.143], and the off-diagonal part of Uᵀ·X·V ≤ 1.4e-6 (fp32) / 0.016 (bf16) of ‖X‖_F.
    Asserted: error < 0.12, singular values in (0.84, 1.16), off-diagonal < 1e-4 / 0.03."""
    torch.manual_seed(1)
    G, P = _conditioned(3, m, n, 100.0)
    X = polar_express(G, backend="torch", dtype=dtype).double()
    assert X.shape == G.shape
    assert rel_err(X, P) < 0.12
    sv = torch.linalg.svdvals(X)
    assert sv.min().item() > 0.84 and sv.max().item() < 1.16
    # Same singular vectors as G: Uᵀ X V is diagonal up to rounding.
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    D = U.mT @ X @ Vh.mT
    off = D - torch.diag_embed(torch.diagonal(D, dim1=-2, dim2=-1))
    bound = 1e-4 if dtype == torch.float32 else 0.03
    assert (off.norm(dim=(-2, -1)) / X.norm(dim=(-2, -1))).max().item() < bound


def test_batched_equals_one_by_one_and_transpose_symmetry():
    torch.manual_seed(2)
    G = torch.randn(2, 3, 40, 24)
    X = polar_express(G, backend="torch", dtype=torch.float32)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(X[i, j], polar_express(G[i, j], backend="torch", dtype=torch.float32),
                                       rtol=1e-5, atol=1e-6)
    # polar(Gᵀ) = polar(G)ᵀ: the tall input is handled by transposing to the wide orientation.
    torch.testing.assert_close(polar_express(G.mT, backend="torch", dtype=torch.float32), X.mT,
                               rtol=1e-5, atol=1e-6)


def test_output_dtype_and_scale_invariance():
    torch.manual_seed(3)
    G = torch.randn(4, 32, 48)
    X = polar_express(G, backend="torch")
    assert X.dtype == torch.bfloat16
    X2 = polar_express(G * 1000.0, backend="torch", dtype=torch.float32)
    torch.testing.assert_close(X2, polar_express(G, backend="torch", dtype=torch.float32), rtol=1e-4, atol=1e-5)
    # Zero input stays zero (normalization by ‖X‖·1.02 + 1e-6, no NaN).
    assert torch.count_nonzero(polar_express(torch.zeros(2, 8, 16), backend="torch")) == 0


def test_bad_arguments():
    G = torch.randn(8, 8)
    with pytest.raises(ValueError, match="coeffs"):
        polar_express(G, coeffs=[])
    with pytest.raises(ValueError, match="backend"):
        polar_express(G, backend="cuda")
    with pytest.raises(ValueError, match="needs a"):
        polar_express(torch.randn(8))
    if not triton_polar.available():  # CPU machine: explicit triton is refused, auto falls back
        with pytest.raises(ValueError, match="triton"):
            polar_express(G, backend="triton")
        torch.testing.assert_close(polar_express(G, backend="auto"), polar_express(G, backend="torch"))
        with pytest.raises(ValueError, match="CUDA"):
            triton_polar.xxt(torch.randn(1, 8, 8))

"""trainer.sm90_check: Triton kernels compiled for sm90 without a GPU (needs triton; skipped without it)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from trainer import mlp_relu2, sm90_check  # noqa: E402
from trainer.sm90_check import SM90_SHARED_BYTES, check, compile_only, main, summarize  # noqa: E402


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_small_preset_compiles_every_kernel_for_sm90_and_restores_torch() -> None:
    rows = summarize(check(["small"], []))
    kernels = {r.kernel for r in rows}
    assert {"_fwd_kernel", "_bwd_kernel", "_lse_kernel", "_grad_kernel", "_transpose_kernel", "_mm_relu2",
            "_xxt_kernel", "_ba_plus_caa_kernel"} <= kernels, kernels
    assert all(r.ok for r in rows), [(r.where, r.verdict, r.error) for r in rows]
    assert all(r.shared > 0 for r in rows if r.kernel in ("_mm_relu2", "_transpose_kernel")), rows
    uses = {r.where: r.use for r in rows}
    assert uses["qk_rotary fwd + bwd (q, k)"] == "default" and uses["qk_rotary fwd + bwd (qkv)"] == "option"
    # nothing of the stand-in GPU is left behind
    assert not torch.zeros(1).is_cuda
    from triton.runtime.jit import JITFunction

    assert JITFunction.run.__name__ == "run"


def test_the_persistent_launch_the_h200_refused_is_caught() -> None:
    """On an H200 (session 8) kernel B of the 4-stage persistent SWEEP entry failed to launch: 262,192 bytes of
    shared memory. The same figure here, from a compile only; the 3-stage entry the GPU tests use fits."""
    three, four = (s for s in mlp_relu2.SWEEP if s.get("persistent") and s["block_k"] == 64 and s["block_n"] == 256)
    assert (three["stages"], four["stages"]) == (3, 4)
    M, d, hid = 49_152, 768, 3072
    x, w = torch.empty(M, d, dtype=torch.bfloat16), torch.empty(hid, d, dtype=torch.bfloat16)
    with compile_only() as rec:
        for launch in (three, four):
            with rec.label("speedrun", f"B s{launch['stages']}", "sweep"):
                mlp_relu2.relu2_grad(x, w, torch.empty(M, hid, dtype=torch.bfloat16), launch)
    by = {r.where: r for r in rec.rows}
    assert by["B s4"].shared == 262_192 and not by["B s4"].ok and "262,192 > 232,448" in by["B s4"].verdict
    assert by["B s3"].ok and by["B s3"].shared <= SM90_SHARED_BYTES


def test_a_kernel_that_does_not_compile_is_a_row_not_a_crash() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def bad(X, B: tl.constexpr):
        i = tl.arange(0, B)
        tl.store(X + i, tl.dot(tl.load(X + i), tl.load(X + i)))  # 1-D operands: no dot

    with compile_only() as rec:
        with rec.label("p", "bad", "default"):
            bad[(1,)](torch.empty(16), B=16)
    (row,) = rec.rows
    assert row.kernel == "bad" and row.error and not row.ok and row.verdict == "FAIL (compile)"


def test_cli_fails_on_a_launch_that_does_not_fit(monkeypatch, capsys) -> None:
    """model.fused_relu2 is off by default, but a config can turn it on: its launch failing fails the check."""
    too_big = next(s for s in mlp_relu2.SWEEP if s.get("persistent") and s["stages"] == 4 and s["block_n"] == 256)
    monkeypatch.setattr(mlp_relu2, "BWD_LAUNCH", too_big)
    assert main(["--preset", "small"]) == 1
    out = capsys.readouterr().out
    assert "option  _mm_relu2_persistent" in out and "FAIL (shared" in out and ", 1 fail" in out


def test_cli_without_triton_says_how_to_get_it(monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)
    assert main(["--preset", "small"]) == 2
    assert "pip install triton" in capsys.readouterr().err


def test_micro_batch_sizes_of_the_speedrun() -> None:
    from trainer.presets import load_config

    cfg = load_config("speedrun")
    assert sm90_check.micro_tokens(cfg) == [16_384, 32_768, 49_152, 262_144]
    assert (768, 3072) in sm90_check.polar_shapes(cfg) and (768, 768) in sm90_check.polar_shapes(cfg)

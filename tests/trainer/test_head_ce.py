"""The fused FP8 head + softcap + cross-entropy kernels (trainer/head_ce.py) against an fp64
reference. They are Triton kernels: on CPU this runs them in Triton's interpreter (skipped where
triton is not installed, as with CPU builds of torch); tests/trainer/test_attention_gpu.py runs
them on a GPU inside the model.

    python -m pytest tests/trainer/test_head_ce.py -q
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = r'''
import torch
from trainer.head_ce import softcap_ce_grad_fp8, softcap_ce_lse
torch.manual_seed(0)
N, V, cap, div, gs = 37, 300, 30.0, 7.5, 1 / 448
raw = (torch.randn(N, V) * 8).bfloat16()
t = torch.randint(0, V, (N,))
loss, lse = softcap_ce_lse(raw, t, cap, div)
z = (cap * torch.sigmoid(raw.double() / div)).bfloat16().double()   # the record's bf16 logits
ref_lse = torch.logsumexp(z, -1)
assert (lse.double() - ref_lse).abs().max() < 1e-5, (lse, ref_lse)
assert (loss.double() - (ref_lse - z[torch.arange(N), t])).abs().max() < 1e-5
g = softcap_ce_grad_fp8(raw, t, lse, torch.tensor([0.125]), cap, div, gs)
assert g.dtype == torch.float8_e5m2 and g.shape == (N, V)
r = raw.double().requires_grad_()
(torch.nn.functional.cross_entropy(cap * torch.sigmoid(r / div), t, reduction="sum") * 0.125).backward()
rel = ((g.double() * gs - r.grad).norm() / r.grad.norm()).item()
assert rel < 0.06, rel                                                    # e5m2 rounding: ~4 %
# the variant that stores z in the lse pass and reads it in the gradient pass: the same bits
from trainer.head_ce import softcap_ce_grad_fp8_from_z, softcap_ce_lse_z, transpose_fp8
loss2, lse2, zz = softcap_ce_lse_z(raw, t, cap, div)
assert torch.equal(loss2, loss) and torch.equal(lse2, lse) and zz.dtype == torch.bfloat16
assert (zz.double() - z).abs().max() <= 2 ** -8 * cap                     # z itself, to a bf16 step
g2 = softcap_ce_grad_fp8_from_z(zz, t, lse2, torch.tensor([0.125]), cap, div, gs)
assert torch.equal(g2.view(torch.uint8), g.view(torch.uint8))
assert torch.equal(transpose_fp8(g).view(torch.uint8), g.view(torch.uint8).t().contiguous())
# G and Gᵀ from one tiled pass (head_ce.GRAD_WRITES_T): the same bits as the gradient pass + the transpose,
# from the raw logits and from z, with tiles that do not divide N or V and with the trainer's launch
from trainer.head_ce import GRAD_BOTH_LAUNCH, grad_both_pass, softcap_ce_grad_fp8_both
for kept, fz in ((raw, False), (zz, True)):
    for bm, bn in ((16, 64), (GRAD_BOTH_LAUNCH["bm"], GRAD_BOTH_LAUNCH["bn"])):
        gb, gbt = grad_both_pass(kept, t, lse, torch.tensor([0.125]), cap, div, gs, bm, bn, 4, from_z=fz)
        assert torch.equal(gb.view(torch.uint8), g.view(torch.uint8)), (fz, bm, bn)
        assert torch.equal(gbt.view(torch.uint8), g.view(torch.uint8).t().contiguous()), (fz, bm, bn)
gb, gbt = softcap_ce_grad_fp8_both(zz, t, lse, torch.tensor([0.125]), cap, div, gs, True)
assert torch.equal(gbt.view(torch.uint8), g.view(torch.uint8).t().contiguous())
print("ok", rel)
'''


def test_fused_head_kernels_match_fp64_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("save_z", [False, True])
@pytest.mark.parametrize("N", [8192, 8000])
def test_fused_head_matches_the_pytorch_graph_on_gpu(N, save_z, monkeypatch):
    """Loss and the x / W gradients of the fused head equal PyTorch's FP8 head + softcap + CE within
    e5m2 rounding (each path rounds the logit gradient to e5m2 once)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from trainer import head_ce
    from trainer.head_ce import fp8_head_ce
    from trainer.model import _FP8Linear, fp8_supported

    monkeypatch.setattr(head_ce, "SAVE_Z", save_z)  # both gradient-pass inputs: raw logits or stored z

    dev = torch.device("cuda")
    if not fp8_supported(dev):
        pytest.skip("GPU lacks FP8 _scaled_mm")
    g = torch.Generator(device="cuda").manual_seed(N)
    d, V = 768, 50304
    x0 = torch.nn.functional.rms_norm(torch.randn(N, d, device=dev, generator=g), (d,)).bfloat16()
    w0 = (torch.randn(V, d, device=dev, generator=g) * 0.05).bfloat16()
    t = torch.randint(0, 50257, (N,), device=dev, generator=g)
    scales = (d ** 0.5 / 448, 2.0 ** -9, 1.0 / 448)
    out = {}
    for name in ("fused", "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if name == "fused":
            loss = fp8_head_ce(x, w, t, scales, 30.0, 7.5)
        else:
            z = 30.0 * torch.sigmoid(_FP8Linear.apply(x, w, *scales) / 7.5)
            loss = torch.nn.functional.cross_entropy(z, t, reduction="sum")
        (loss / 8).backward()
        out[name] = (loss.detach().float(), x.grad.float(), w.grad.float())
    (lf, xf, wf), (lt, xt, wt) = out["fused"], out["torch"]
    # the PyTorch graph sums in bf16 (its loss is a bf16 number: 2^-8 relative steps); ours in fp32
    assert torch.isfinite(lf) and abs(float(lf - lt)) < 2 ** -7 * abs(float(lt)), (float(lf), float(lt))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(xf, xt) < 0.08 and rel(wf, wt) < 0.08, (rel(xf, xt), rel(wf, wt))


@pytest.mark.gpu
def test_gradient_writing_its_transpose_gives_the_same_gradients_on_gpu(monkeypatch):
    """head_ce.GRAD_WRITES_T (G and Gᵀ from one tiled pass) changes no bit of the head's x and W gradients."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from trainer import head_ce
    from trainer.model import fp8_supported

    dev = torch.device("cuda")
    if not fp8_supported(dev):
        pytest.skip("GPU lacks FP8 _scaled_mm")
    g = torch.Generator(device="cuda").manual_seed(1)
    N, d, V = 8000, 768, 50304
    x0 = torch.nn.functional.rms_norm(torch.randn(N, d, device=dev, generator=g), (d,)).bfloat16()
    w0 = (torch.randn(V, d, device=dev, generator=g) * 0.05).bfloat16()
    t = torch.randint(0, 50257, (N,), device=dev, generator=g)
    grads = []
    for writes_t in (False, True):
        monkeypatch.setattr(head_ce, "GRAD_WRITES_T", writes_t)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        head_ce.fp8_head_ce(x, w, t, (d ** 0.5 / 448, 2.0 ** -9, 1.0 / 448), 30.0, 7.5).backward()
        grads.append((x.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])

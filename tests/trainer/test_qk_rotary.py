"""The fused q/k RMS-norm + rotary kernels (trainer/qk_rotary.py, model.fused_qk_rotary) against an
fp64 reference of the model's unfused math: on CPU in Triton's interpreter (skipped where triton is
not installed, as with CPU builds of torch), on a GPU at the speedrun's shape and inside the model.

    python -m pytest tests/trainer/test_qk_rotary.py -q
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = r'''
import sys
import torch
import torch.nn.functional as F
from trainer.attention import Rotary, apply_rotary
from trainer.qk_rotary import norm_rotary
torch.manual_seed(0)
T, H, D = int(sys.argv[1]), int(sys.argv[2]), 128
dev = sys.argv[3]
for table_dtype in (torch.bfloat16, torch.float32):
    # rows from rms 0.02 to 2: small rows are where the norm's eps shows (F.rms_norm's: fp32's, not bf16's)
    scale = torch.logspace(-1.7, 0.3, T, device=dev)[:, None, None, None]
    qkv = (torch.randn(T, 3, H, D, device=dev) * scale).bfloat16()
    rot = Rotary(D, 32, 1 / 1024, 0.12, 1.0, 32.0, dtype=table_dtype).to(dev)
    rot.precompute(T + 5)
    rot.extend(128, 384)  # a YaRN-extended table
    cos, sin = rot.cos_sin(T, torch.device(dev))
    qk = qkv.clone().requires_grad_()
    oq, ok = norm_rotary(qk[:, 0], qk[:, 1], cos, sin)
    assert oq.shape == (T, H, D) and oq.is_contiguous() and oq.dtype == torch.bfloat16
    ref = qkv.double().requires_grad_()

    def path(x):  # the model's rms_norm (F.rms_norm: eps = fp32's for bf16 input) then apply_rotary, in fp64
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
        x1, x2 = x.chunk(2, -1)
        c, s = cos.double(), sin.double()
        return torch.cat((x1 * c + x2 * s, x2 * c - x1 * s), -1)

    rq, rk = path(ref[:, 0]), path(ref[:, 1])
    model_q = apply_rotary(F.rms_norm(qkv[:, 0].float(), (D,)), cos.float(), sin.float()).double()
    assert ((model_q - rq).norm() / rq.norm()).item() < 1e-5  # the reference is the model's math
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(oq, rq) < 6e-3 and rel(ok, rk) < 6e-3, (rel(oq, rq), rel(ok, rk))  # bf16 output rounding
    gq, gk = torch.randn(T, H, D, device=dev).bfloat16(), torch.randn(T, H, D, device=dev).bfloat16()
    ((oq.float() * gq.float()).sum() + (ok.float() * gk.float()).sum()).backward()
    ((rq * gq.double()).sum() + (rk * gk.double()).sum()).backward()
    for i in (0, 1):
        assert rel(qk.grad[:, i], ref.grad[:, i]) < 1e-2, (i, rel(qk.grad[:, i], ref.grad[:, i]))
    assert not qk.grad[:, 2].any()  # v is not an input of the op
print("ok")
'''


def _run(env_extra: dict, *args: str, script: str = CHECK) -> subprocess.CompletedProcess:
    """`script` (CHECK by default) in a fresh interpreter with this checkout first on PYTHONPATH."""
    env = {**os.environ, **env_extra,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)


def test_fused_qk_rotary_matches_fp64_reference_in_the_interpreter():
    pytest.importorskip("triton")
    r = _run({"TRITON_INTERPRET": "1"}, "37", "6", "cpu")  # a partial last block, heads padded 6 → 8
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


@pytest.mark.gpu
def test_fused_qk_rotary_matches_fp64_reference_on_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    r = _run({}, "49152", "6", "cuda")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


@pytest.mark.gpu
def test_the_model_with_fused_qk_rotary_compiles_and_matches_the_unfused_one():
    """model.fused_qk_rotary, and with it model.fused_qkv, inside the compiled `small` model (fullgraph):
    the loss and gradients of one micro-batch match the unfused model's within bf16 rounding."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from trainer.model import GPT
    from trainer.presets import load_config

    dev = torch.device("cuda")
    T = 8192
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (T,), generator=g).to(dev)
    y = torch.randint(0, 50257, (T,), generator=g).to(dev)
    docs = torch.zeros(T, dtype=torch.int32, device=dev)
    out = {}
    for fused in (False, True, "qkv"):
        cfg = load_config("small", {"model.fused_qk_rotary": bool(fused), "model.fused_qkv": fused == "qkv",
                                    "model.attn_backend": "flex"})
        torch.manual_seed(0)
        model = GPT(cfg.model).to(dev)
        gen = torch.Generator(device=dev).manual_seed(1)
        with torch.no_grad():  # W_O starts at zero: make it non-zero so q and k get gradients
            for b in model.blocks:
                if b.attn is not None:
                    d = b.attn.d
                    w_o = b.attn.qkvo_w.view(4, d, d)[3]
                    w_o.copy_(torch.randn(w_o.shape, device=dev, generator=gen) * 0.02)
            # lm_head starts at zero too: then no gradient reaches any layer below it
            model.lm_head.copy_(torch.randn(model.lm_head.shape, device=dev, generator=gen) * 0.02)
        model.rotary.precompute(T)
        fwd = torch.compile(model, dynamic=False, fullgraph=True)
        win = torch.tensor(384, dtype=torch.int32, device=dev)
        loss = fwd(x, y, docs, win, win)
        loss.backward()
        qkv = [b.attn.qkvo_w.grad.float().flatten() for b in model.blocks if b.attn is not None]
        assert all(float(q.norm()) > 0 for q in qkv)  # q and k's backward is in what is compared
        out[fused] = (float(loss), torch.cat(qkv))
    (l0, g0) = out[False]
    for fused in (True, "qkv"):
        l1, g1 = out[fused]
        assert abs(l1 - l0) <= 1e-2 * abs(l0), (fused, l0, l1)
        assert float((g1 - g0).norm() / g0.norm()) < 5e-2, fused


MODEL_CHECK = r'''
import sys
import torch
from trainer.model import GPT
from trainer.presets import load_config
T = 96
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 500, (T,), generator=g), torch.randint(0, 500, (T,), generator=g)
docs = torch.zeros(T, dtype=torch.int32)
docs[40:] = 1
packed = sys.argv[1:] == ["packed"]  # compare fused q/k with and without model.fused_qkv instead
out = {}
for fused in (False, True):
    cfg = load_config("tiny", {"model.fused_qk_rotary": fused or packed, "model.fused_qkv": fused and packed,
                               "model.head_dim": 128, "model.num_heads": 1, "model.model_dim": 128})
    assert not packed or (cfg.model.premul_o and cfg.model.num_value_embeds > 0)  # v + ve goes through the op
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # W_O starts at zero: make it non-zero so q and k get gradients
        for b in model.blocks:
            if b.attn is not None:
                w_o = b.attn.qkvo_w.view(4, 128, 128)[3]
                w_o.copy_(torch.randn(w_o.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        # lm_head starts at zero too: then no gradient reaches any layer below it
        model.lm_head.copy_(torch.randn(model.lm_head.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    model.rotary.precompute(T)
    loss = model(x, y, docs, 64, 32)
    loss.backward()
    qkv = [b.attn.qkvo_w.grad.flatten() for b in model.blocks if b.attn is not None]
    assert all(float(q.norm()) > 0 for q in qkv)  # q and k's backward is in what is compared
    out[fused] = (float(loss), torch.cat(qkv))
    out[fused] = out[fused] + (torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]),)
(l0, g0, a0), (l1, g1, a1) = out[False], out[True]
if packed:  # the same bits: only where dq, dk, dv are gathered into d(qkv) moved
    assert l0 == l1 and torch.equal(a0, a1), (l0, l1)
    print("ok", l0, l1)
    sys.exit(0)
assert abs(l1 - l0) <= 1e-3 * abs(l0), (l0, l1)
rel = float((g1 - g0).norm() / g0.norm())
assert 0 < rel < 5e-2, rel
print("ok", l0, l1, rel)
'''


def test_the_model_takes_the_fused_path_and_trains_alike_in_the_interpreter():
    """The tiny model (head_dim 128, sdpa on CPU) with model.fused_qk_rotary: the op inside the
    model (autograd through the Triton kernels) gives the unfused loss and gradients within rounding."""
    pytest.importorskip("triton")
    r = _run({"TRITON_INTERPRET": "1"}, script=MODEL_CHECK)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_the_model_with_fused_qkv_gives_the_same_bits_in_the_interpreter():
    """model.fused_qkv inside the tiny model (value embeddings on, premul_o): loss and every
    parameter's gradient equal the fused q/k path's bit for bit."""
    pytest.importorskip("triton")
    r = _run({"TRITON_INTERPRET": "1"}, "packed", script=MODEL_CHECK)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_a_head_dim_the_kernel_cannot_take_runs_the_unfused_ops():
    """On by default, so a head size the kernels cannot take (head_dim/2 not a power of two) must not
    be a config error: the model takes the unfused ops for it."""
    from trainer import qk_rotary
    from trainer.presets import load_config

    cfg = load_config("tiny", {"model.head_dim": 24, "model.num_heads": 2, "model.model_dim": 48})
    assert cfg.model.fused_qk_rotary and not qk_rotary.fits(24)
    assert [d for d in (8, 16, 24, 32, 48, 64, 96, 128, 256) if qk_rotary.fits(d)] == [8, 16, 32, 64, 128, 256]


PACKED_CHECK = r'''
import sys
import torch
from trainer.qk_rotary import norm_rotary, qkv_norm_rotary
torch.manual_seed(0)
T, H, D = int(sys.argv[1]), int(sys.argv[2]), 128
dev = sys.argv[3]
scale = torch.logspace(-1.7, 0.3, T, device=dev)[:, None, None, None]
qkv0 = (torch.randn(T, 3, H, D, device=dev) * scale).bfloat16()
cos = torch.randn(T + 3, 1, D // 2, device=dev).bfloat16()
sin = torch.randn(T + 3, 1, D // 2, device=dev).bfloat16()
grads = [torch.randn(T, H, D, device=dev).bfloat16() for _ in range(3)]
for with_ve in (False, True):
    ve0 = torch.randn(T, H, D, device=dev).bfloat16() if with_ve else None
    # separate: the op for q and k, v (+ ve) by PyTorch, the gradient gathered by autograd
    a = qkv0.clone().requires_grad_()
    ea = ve0.clone().requires_grad_() if with_ve else None
    q, k, v = a.unbind(1)
    q, k = norm_rotary(q, k, cos, sin)
    v = v + ea if with_ve else v
    # packed: one op from the product
    b = qkv0.clone().requires_grad_()
    eb = ve0.clone().requires_grad_() if with_ve else None
    pq, pk, pv = qkv_norm_rotary(b, eb, cos, sin)
    for x, y in ((q, pq), (k, pk), (v, pv)):
        assert x.dtype == y.dtype and torch.equal(x, y), "forward differs"
    assert pv.is_contiguous() and pv.data_ptr() != b.data_ptr()
    sum((o.float() * g.float()).sum() for o, g in zip((q, k, v), grads)).backward()
    sum((o.float() * g.float()).sum() for o, g in zip((pq, pk, pv), grads)).backward()
    assert torch.equal(a.grad, b.grad), "d(qkv) differs"
    assert b.grad[:, 2].abs().sum() > 0 and b.grad[:, 0].abs().sum() > 0
    if with_ve:
        assert torch.equal(ea.grad, eb.grad), "d(ve) differs"
print("ok")
'''


def test_packed_qkv_op_gives_the_separate_ops_bits_in_the_interpreter():
    """model.fused_qkv's op (the QKV product in, q, k, v + ve out, d(qkv) written whole) against the
    separate q/k op with v + ve and the gradient gathered by autograd: the same bits both ways."""
    pytest.importorskip("triton")
    r = _run({"TRITON_INTERPRET": "1"}, "37", "6", "cpu", script=PACKED_CHECK)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


@pytest.mark.gpu
def test_packed_qkv_op_gives_the_separate_ops_bits_on_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    r = _run({}, "49152", "6", "cuda", script=PACKED_CHECK)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]

"""The fa4 backend's plumbing on CPU: the custom op's kernels, autograd, compile behaviour, the
host-side document boundaries (trainer.feed) and backend resolution. The kernels themselves run
only on a Hopper GPU: tests/trainer/test_attention_gpu.py.

    python -m pytest tests/trainer/test_fa4.py -q
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.attention import attend, build_mask, reference_attention
from trainer.config import apply_overrides
from trainer.presets import load_config
from trainer.data import Batch
from trainer.fa4 import docs_from_cu_seqlens, fa4_attention, fa4_available
from trainer.feed import CU_MULTIPLE, Feed, doc_bounds
from trainer.model import GPT
from trainer.train import InputError, resolve_backend

CPU = torch.device("cpu")


def _docs(T, p, seed=0, first_bos=True):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(T, generator=g) < p
    starts[0] = first_bos
    return torch.cumsum(starts.int(), 0).int()


def _cu(docs, length=None):
    b = doc_bounds(docs.numpy())
    length = length or b.size
    out = np.full(length, docs.numel(), dtype=np.int32)
    out[:b.size] = b
    return torch.from_numpy(out)


@pytest.mark.parametrize("T,window,p", [(256, 40, 0.02), (300, 100, 0.0), (500, 0, 0.05), (130, 500, 0.01)])
def test_cpu_kernel_equals_reference_attention(T, window, p):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(T, 2, 32, generator=g) for _ in range(3))
    docs = _docs(T, p, seed=T)
    ref = reference_attention(q, k, v, docs, window, 0.12)
    y = fa4_attention(q, k, v, _cu(docs, length=docs.unique().numel() + 7), T, window, 0.12)  # padded
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)
    y2 = attend(q, k, v, build_mask(None, window, "fa4", _cu(docs), T), "fa4", torch.tensor(0.12))
    torch.testing.assert_close(y2, ref, atol=2e-5, rtol=1e-4)


def test_backward_equals_autograd_of_reference():
    g = torch.Generator().manual_seed(3)
    T = 200
    q, k, v = (torch.randn(T, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    docs = _docs(T, 0.03, seed=4)
    dout = torch.randn(T, 2, 16, generator=g)
    fa4_attention(q, k, v, _cu(docs), T, 50, 0.2).backward(dout)
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_attention(q, k, v, docs, 50, 0.2).backward(dout)
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_op_passes_torch_library_opcheck():
    """Schema, fake kernel and autograd registration agree with the real (CPU) kernel."""
    g = torch.Generator().manual_seed(0)
    T = 96
    q, k, v = (torch.randn(T, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    args = (q, k, v, _cu(_docs(T, 0.05)), T, torch.tensor(20, dtype=torch.int32), torch.tensor(0.3))
    torch.library.opcheck(torch.ops.trainer.fa4_fwd.default, args)
    dout = torch.randn(T, 2, 16, generator=g)
    out, lse = torch.ops.trainer.fa4_fwd(*args)
    torch.library.opcheck(torch.ops.trainer.fa4_bwd.default, (dout, *(t.detach() for t in (q, k, v, out, lse)), *args[3:]))


def test_docs_from_cu_seqlens_inverts_the_boundaries():
    docs = _docs(400, 0.02, seed=9, first_bos=False)
    got = docs_from_cu_seqlens(_cu(docs, length=128), 400)
    assert torch.equal(got, (docs - docs[0]).long())


def test_model_fa4_compiles_once_for_every_window_and_reads_the_yarn_scale():
    """The fa4 path compiles to one graph for all windows and YaRN scales (both are CPU tensors
    to the compiled model), equals the sdpa path, and the scale is read at run time."""
    from torch._dynamo.testing import CompileCounter

    cfg = load_config("tiny", {"model.attn_backend": "fa4"})
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sdpa = GPT(apply_overrides(cfg, {"model.attn_backend": "sdpa"}).model).eval()
    sdpa.load_state_dict(model.state_dict())
    T = 512
    x, y = torch.randint(0, 500, (T,)), torch.randint(0, 500, (T,))
    docs = _docs(T, 0.01, seed=1)
    cu = _cu(docs, length=CU_MULTIPLE)
    counter = CompileCounter()
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=counter)
    losses = []
    with torch.no_grad():
        for w in (32, 64, 96):
            got = compiled(x, y, None, torch.tensor(w, dtype=torch.int32), torch.tensor(w // 2, dtype=torch.int32),
                           cu_seqlens=cu, max_seqlen=T)
            want = sdpa(x, y, docs, w, w // 2)
            assert torch.allclose(got, want, atol=1e-4), (w, got, want)
            losses.append(float(got))
            model.rotary.extend(w, w + 32)
            sdpa.rotary.extend(w, w + 32)
    assert counter.frame_count == 1
    assert len(set(losses)) == 3


def test_scale_in_kernel_is_a_real_switch():
    """model.scale_in_kernel=false pre-multiplies q in bf16: a different (close) loss."""
    torch.manual_seed(0)
    cfg = load_config("tiny")
    a = GPT(cfg.model).eval()
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b = GPT(apply_overrides(cfg, {"model.scale_in_kernel": False}).model).eval()
    b.load_state_dict(a.state_dict())
    T = 300
    x = torch.randint(0, 500, (T + 1,))
    docs = _docs(T, 0.02)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        la, lb = a(x[:-1], x[1:], docs, 64, 32), b(x[:-1], x[1:], docs, 64, 32)
    assert la != lb and abs(float(la) - float(lb)) < 0.05 * abs(float(la))


# -- trainer.feed ------------------------------------------------------------------------------
def _batch(docs: np.ndarray) -> Batch:
    T = docs.size
    return Batch(inputs=np.arange(T, dtype=np.int64), targets=np.arange(T, dtype=np.int64), docs=docs)


def test_feed_builds_padded_cu_seqlens_and_grows_them_once():
    T = 1000
    docs = np.repeat(np.arange(1, 6, dtype=np.int32), [100, 300, 50, 500, 50])
    feed = Feed("fa4", CPU, max_seqlen=600)
    b = feed(_batch(docs))
    assert b.docs is None and b.max_seqlen == 600
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.numel() % CU_MULTIPLE == 0
    assert b.cu_seqlens[:6].tolist() == [0, 100, 400, 450, 950, 1000]
    assert (b.cu_seqlens[6:] == T).all()
    many = np.arange(T, dtype=np.int32) // 3  # 334 documents: more than the initial capacity
    b2 = feed(_batch(many))
    assert b2.cu_seqlens.numel() == 384 and b2.cu_seqlens[334] == T
    assert feed(_batch(docs)).cu_seqlens.numel() == 384  # keeps the grown length (one shape)
    ev = feed.eval_batches([_batch(docs), _batch(many)])
    assert {e.cu_seqlens.numel() for e in ev} == {384} and {e.max_seqlen for e in ev} == {T}


def test_feed_refuses_a_document_longer_than_max_seqlen():
    docs = np.repeat(np.arange(2, dtype=np.int32), [100, 900])
    with pytest.raises(RuntimeError, match="max_seqlen=600"):
        Feed("fa4", CPU, max_seqlen=600)(_batch(docs))
    assert Feed("fa4", CPU, max_seqlen=600, aligned=False)(_batch(docs)).max_seqlen == 1000


def test_feed_gives_docs_to_the_other_backends():
    docs = np.repeat(np.arange(2, dtype=np.int32), [10, 20])
    b = Feed("flex", CPU, max_seqlen=2048)(_batch(docs))
    assert b.cu_seqlens is None and torch.equal(b.docs, torch.from_numpy(docs))


# -- resolution ---------------------------------------------------------------------------------
def test_auto_resolves_to_sdpa_on_cpu_and_fa4_is_refused_with_the_fix():
    cfg = load_config("small")
    assert cfg.model.attn_backend == "auto"
    assert resolve_backend(cfg, CPU).model.attn_backend == "sdpa"
    assert resolve_backend(apply_overrides(cfg, {"model.attn_backend": "flex"}), CPU).model.attn_backend == "flex"
    ok, why = fa4_available(CPU)
    assert not ok and "CUDA" in why
    with pytest.raises(InputError, match=r'pip install -e "\.\[fa4\]"'):
        resolve_backend(apply_overrides(cfg, {"model.attn_backend": "fa4"}), CPU)


def test_cli_fa4_on_cpu_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--preset", "tiny", "--set", "model.attn_backend=fa4",
                        "--set", f"data.data_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "fa4" in r.stderr and ".[fa4]" in r.stderr
    assert '"event":"error"' in r.stdout

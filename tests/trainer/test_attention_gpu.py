"""Attention backends on a GPU: fa4 and flex against an fp32 reference (outputs and q/k/v grads,
several windows and document layouts, T up to 48k), and 50 training steps of the `small` preset
with fa4 vs flex. Skipped without CUDA; fa4 cases also without flash-attn-4 or below sm90.

    python -m pytest tests/trainer/test_attention_gpu.py -q        # on a GPU node (benchmarks/gpu_acceptance.sh runs it)
"""
import math

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, D = 6, 128
SCALE = 0.12


def _fa4_ok() -> bool:
    from trainer.fa4 import fa4_available

    return fa4_available(torch.device("cuda"))[0]


needs_fa4 = pytest.mark.skipif(not torch.cuda.is_available() or not _fa4_ok(),
                               reason="needs flash-attn-4 on an sm90+ GPU")


def _layout(T: int, kind: str, g: np.random.Generator) -> np.ndarray:
    """Document id per position: 'one' (a single document), 'short' (mean 300), 'train' (BOS-aligned,
    clipped at 2048), 'val' (the stream cut mid-document, lengths up to 8k)."""
    if kind == "one":
        return np.ones(T, dtype=np.int32)
    hi = {"short": 600, "train": 2048, "val": 8000}[kind]
    lens = g.integers(1, hi, size=T)  # plenty
    if kind == "train":
        lens = np.minimum(g.geometric(1 / 900, size=T), 2048)
    docs = np.repeat(np.arange(lens.size, dtype=np.int32), lens)[:T]
    return docs + (0 if kind == "val" else 1)


def _reference(q, k, v, docs, window, scale, chunk=2048):
    """fp32 attention by query chunks (each against its window of keys): (T, H, D)."""
    T = q.shape[0]
    qf, kf, vf = q.float(), k.float(), v.float()
    out = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        ks = max(0, s - window)
        qp = torch.arange(s, e, device=q.device)[:, None]
        kp = torch.arange(ks, e, device=q.device)[None, :]
        m = (qp >= kp) & (qp - kp <= window) & (docs[s:e, None] == docs[None, ks:e])
        sc = torch.einsum("qhd,khd->hqk", qf[s:e], kf[ks:e]) * scale
        p = torch.softmax(sc.masked_fill(~m[None], float("-inf")), dim=-1)
        out.append(torch.einsum("hqk,khd->qhd", p, vf[ks:e]))
    return torch.cat(out)


def _inputs(T, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(T, H, D, device="cuda", generator=g) for _ in range(3))
    q, k = (torch.nn.functional.rms_norm(t, (D,)) for t in (q, k))  # as the model feeds them
    return [t.bfloat16().requires_grad_() for t in (q, k, v)], torch.randn(T, H, D, device="cuda", generator=g).bfloat16()


def _run(backend, q, k, v, docs_np, window, dout):
    from trainer.attention import attend, build_mask
    from trainer.feed import Feed
    from trainer.data import Batch

    T = docs_np.size
    feed = Feed(backend, torch.device("cuda"), max_seqlen=T)
    b = feed(Batch(inputs=np.zeros(T, np.int64), targets=np.zeros(T, np.int64), docs=docs_np), eval_shape=True)
    if backend == "fa4":
        mask = build_mask(None, torch.tensor(window, dtype=torch.int32), "fa4", b.cu_seqlens, b.max_seqlen)
        scale = torch.tensor(SCALE)
        fn = attend
    else:
        mask = build_mask(b.docs, torch.tensor(window, device="cuda", dtype=torch.int32), "flex")
        scale = torch.tensor(SCALE, device="cuda")
        fn = _compiled_attend()
    for t in (q, k, v):
        t.grad = None
    y = fn(q, k, v, mask, backend, scale)
    y.backward(dout)
    return y.detach().float(), [t.grad.float() for t in (q, k, v)]


_COMPILED = {}


def _compiled_attend():
    from trainer.attention import attend

    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(attend, fullgraph=True, dynamic=False)
    return _COMPILED["flex"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# three sequence lengths (one flex compile each; windows and documents are data), four layouts
CASES = [(3000, "one", 384), (3000, "short", 128), (16384, "train", 896), (16384, "val", 1664),
         (49152, "train", 1664), (49152, "short", 2560), (49152, "val", 384)]


@pytest.mark.parametrize("T,kind,window", CASES)
@pytest.mark.parametrize("backend", ["fa4", "flex"])
def test_backend_matches_fp32_reference(backend, T, kind, window):
    if backend == "fa4" and not _fa4_ok():
        pytest.skip("needs flash-attn-4 on an sm90+ GPU")
    docs_np = _layout(T, kind, np.random.default_rng(T + window))
    (q, k, v), dout = _inputs(T, seed=T + window)
    y, grads = _run(backend, q, k, v, docs_np, window, dout)
    docs = torch.from_numpy(docs_np).cuda()
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _reference(qr, kr, vr, docs, window, SCALE)
    ref.backward(dout.float())
    assert torch.isfinite(y).all()
    assert _rel(y, ref.detach()) < 5e-3, _rel(y, ref.detach())
    for name, gr, rf in zip("qkv", grads, (qr.grad, kr.grad, vr.grad)):
        assert torch.isfinite(gr).all(), name
        assert _rel(gr, rf) < 1.5e-2, (name, _rel(gr, rf))


@needs_fa4
def test_fa4_and_flex_agree_with_each_other():
    T, window = 16384, 896
    docs_np = _layout(T, "train", np.random.default_rng(1))
    (q, k, v), dout = _inputs(T, seed=1)
    ya, ga = _run("fa4", q, k, v, docs_np, window, dout)
    yb, gb = _run("flex", q, k, v, docs_np, window, dout)
    assert _rel(ya, yb) < 5e-3
    for a, b in zip(ga, gb):
        assert _rel(a, b) < 2e-2


@needs_fa4
def test_small_preset_50_steps_fa4_vs_flex(tmp_path_factory):
    """Fifty training steps of the `small` preset from one seed: the fa4 and flex runs' val losses
    agree within bf16 noise, measured as the gap between two flex runs of different seeds."""
    from trainer.presets import load_config
    from trainer.data import write_synthetic
    from trainer.train import main

    data = tmp_path_factory.mktemp("synth-small50")
    write_synthetic(data, train_tokens=8_000_000, val_tokens=262_144, vocab=50257, bos_id=50256, seed=5,
                    mean_doc_len=600, zipf_a=1.1, shard_tokens=8_000_000)
    final = {}
    for backend, seed in (("fa4", 0), ("flex", 0), ("flex", 1)):
        cfg = load_config("small", {
            "model.attn_backend": backend, "data.data_dir": str(data), "data.synthetic": False, "seed": seed,
            "schedule.num_scheduled_iterations": 50, "schedule.num_extension_iterations": 0,
            "eval.val_loss_every": 0, "eval.val_tokens": 262_144, "runtime.warmup": False,
        })
        end = main(cfg)
        final[(backend, seed)] = end["final_val_loss"]
        assert math.isfinite(end["final_val_loss"]) and end["final_val_loss"] < math.log(50304) - 1.0
    gap = abs(final[("fa4", 0)] - final[("flex", 0)])
    noise = abs(final[("flex", 1)] - final[("flex", 0)])
    assert gap <= max(0.02, 2 * noise), final

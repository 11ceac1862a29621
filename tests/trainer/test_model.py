"""Model: shapes, parameter families, layouts, masks, attention backends, YaRN.

    python -m pytest tests/trainer/test_model.py -q
"""
import math

import pytest
import torch

from trainer.attention import (Rotary, apply_rotary, attend, block_classes, block_spans, build_mask, dense_mask,
                               flex_block_mask, reference_attention)
from trainer.config import ADAM_FAMILIES, MUON_FAMILIES, apply_overrides
from trainer.presets import load_config
from trainer.model import GPT, fp8_supported

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TINY = load_config("tiny").model
WIDE_UNET = apply_overrides(load_config("tiny"), {
    "model.weight_layout": "wide", "model.skip_mode": "unet", "model.premul_o": False,
    "model.sa_lambdas_init": [0.5, 0.5], "model.block_lambdas_init": [1.0, 0.0]}).model


def _batch(T=300, vocab=512, bos=511, seed=0, p_bos=0.02):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab - 1, (T + 1,), generator=g)
    x[torch.rand(T + 1, generator=g) < p_bos] = bos
    x[0] = bos
    inputs, targets = x[:-1], x[1:]
    return inputs, targets, torch.cumsum(inputs == bos, 0).to(torch.int32)


def _randomize(model, seed=0):
    """Give the zero-initialised weights (O, c_proj, gates, head, λs) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return model


@pytest.mark.parametrize("mcfg", [TINY, WIDE_UNET], ids=["tiny", "wide-unet"])
def test_forward_backward_shapes(mcfg):
    torch.manual_seed(0)
    m = GPT(mcfg)
    inputs, targets, docs = _batch()
    loss = m(inputs, targets, docs, 64, 32)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # zero lm_head → uniform logits: sum of CE ≈ T·ln(padded vocab) (bf16 logits, so only roughly)
    assert loss.item() == pytest.approx(300 * math.log(mcfg.padded_vocab), rel=3e-2)
    loss.backward()
    for fam, p in m.param_families():
        if fam == "value_embed" and p is not m.value_embeds[0].weight and p is not m.value_embeds[1].weight:
            continue
        assert p.grad is not None and p.grad.shape == p.shape, fam
    m.eval()
    with torch.no_grad():
        ev = m(inputs, targets, docs, 64, 32)
    assert ev.item() == pytest.approx(math.log(mcfg.padded_vocab), rel=1e-4)  # mean over fp32 logits


def test_param_families_cover_everything_once():
    m = GPT(TINY, world_size=2)
    fams = m.param_families()
    ids = [id(p) for _, p in fams]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {f for f, _ in fams} <= set(MUON_FAMILIES) | set(ADAM_FAMILIES)
    counts = {f: sum(1 for g, _ in fams if g == f) for f in MUON_FAMILIES + ADAM_FAMILIES}
    # tiny: 6 layers, no attention in 0 and 3, no MLP in 0
    assert counts == {"attn": 4, "mlp_up": 5, "mlp_down": 5, "attn_gate": 4, "smear_gate": 1,
                      "embed": 1, "value_embed": 2, "scalars": 1, "head": 1}
    for f, p in fams:
        if f in ADAM_FAMILIES:
            assert p.shape[0] % 2 == 0  # DistAdam shards rows over 2 ranks


def test_speedrun_structure_and_dtypes():
    cfg = apply_overrides(load_config("speedrun"), {"model.model_dim": 128, "model.num_heads": 1,
                                                    "model.vocab_size": 1000, "data.bos_id": 999}).model
    for ws, n_scalars in ((1, 62), (8, 64)):
        m = GPT(cfg, world_size=ws)
        assert m.scalars.numel() == n_scalars  # 12 skip + 24 + 24 + smear + backout + pad
    fams = m.param_families()
    muon = [f for f, _ in fams if f in MUON_FAMILIES]
    assert len(muon) == 43 and len(fams) - len(muon) == 6
    assert sum(f == "attn" for f in muon) == 10 and sum(f == "mlp_up" for f in muon) == 11
    assert m.embed.weight.shape == (1024, 128)  # padded to a multiple of 128
    d = dict((id(p), f) for f, p in fams)
    for f, p in fams:
        want = torch.float32 if f in ("attn", "mlp_up", "mlp_down", "scalars") else torch.bfloat16
        assert p.dtype == want, f
    blk = m.blocks[1]
    assert blk.attn.qkvo_w.shape == (512, 128) and blk.mlp.c_fc.shape == (512, 128)
    w = blk.attn.qkvo_w.view(4, 128, 128)
    bound = 3 ** 0.5 * 0.5 * 128 ** -0.5
    assert w[:3].abs().max() <= bound and w[:3].abs().max() > 0.9 * bound and w[3].abs().max() == 0
    assert blk.mlp.c_proj.abs().max() == 0 and m.lm_head.abs().max() == 0
    assert m.blocks[0].empty and m.blocks[7].attn is None and m.blocks[7].mlp is not None
    assert torch.allclose(m.scalars[12:36].view(12, 2), torch.tensor([1.1, 0.0]).expand(12, 2))
    assert torch.allclose(m.scalars[36:60].view(12, 2), torch.tensor([0.5, 1.0]).expand(12, 2))
    assert (m.scalars[:12] == -1.5).all() and m.scalars[60] == 0 and m.scalars[61] == 0.5
    assert len(d) == len(fams)


def test_tall_and_wide_layouts_compute_the_same_function():
    torch.manual_seed(0)
    tall = _randomize(GPT(TINY))
    wide_cfg = apply_overrides(load_config("tiny"), {"model.weight_layout": "wide"}).model
    wide = GPT(wide_cfg)
    sd = tall.state_dict()
    for k, v in list(sd.items()):
        if k.endswith("qkvo_w"):
            sd[k] = v.reshape(v.shape[1], v.shape[0])  # same memory: (4, d, d) blocks unchanged
        elif k.endswith("c_fc") or k.endswith("c_proj"):
            sd[k] = v.t().contiguous()
    wide.load_state_dict(sd)
    assert wide.blocks[1].attn.qkvo_w.shape == (64, 256)
    inputs, targets, docs = _batch()
    assert tall(inputs, targets, docs, 64, 32).item() == wide(inputs, targets, docs, 64, 32).item()


def test_premul_o_semantics():
    torch.manual_seed(0)
    a = _randomize(GPT(TINY))
    b_cfg = apply_overrides(load_config("tiny"), {"model.premul_o": False}).model
    b = GPT(b_cfg)
    b.load_state_dict(a.state_dict())
    L = TINY.num_layers
    inputs, targets, docs = _batch()
    with torch.no_grad():
        a.scalars[3 * L:5 * L] = 1.0  # λ0 = λ1 = 1: both forms are v = W_v x + ve, W_O unscaled
        b.scalars.copy_(a.scalars)
    la, lb = a(inputs, targets, docs, 64, 32).item(), b(inputs, targets, docs, 64, 32).item()
    assert la == pytest.approx(lb, rel=1e-3)
    with torch.no_grad():
        a.scalars[3 * L:5 * L] = torch.tensor([0.5, 0.25]).repeat(L)
        b.scalars.copy_(a.scalars)
    a.eval(), b.eval()  # fp32 mean loss: the bf16 training sum (~1900) resolves only steps of 8
    assert abs(a(inputs, targets, docs, 64, 32).item() - b(inputs, targets, docs, 64, 32).item()) > 1e-4


# -- masks and attention ---------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, 5, 100, 127, 128, 300, 1000])
def test_block_classes_match_dense_mask(window):
    g = torch.Generator().manual_seed(window)
    T, B = 1024, 128
    docs = torch.cumsum((torch.rand(T, generator=g) < 0.004).int(), 0).int()
    dense = dense_mask(docs, window).view(T // B, B, T // B, B).transpose(1, 2)
    any_, full = block_classes(docs, window, B)
    assert torch.equal(any_, dense.any(-1).any(-1))
    assert torch.equal(full, dense.all(-1).all(-1))


def _spans_dense(num, idx, n):
    """The (n, n) block matrix a (count, indices) pair lists; fails on a repeated index."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for r in range(n):
        k = int(num[0, 0, r])
        cols = idx[0, 0, r, :k].long()
        assert cols.unique().numel() == k, (r, cols)
        m[r, cols] = True
    return m


@pytest.mark.parametrize("block", [4, 16, 128])
def test_block_spans_list_exactly_the_dense_block_classes(block):
    """Every block count (1 … 33), document density and window edge case: the index-arithmetic
    BlockMask lists exactly the partial and full blocks of the dense reference, both orientations."""
    g = torch.Generator().manual_seed(block)
    for n in (1, 2, 3, 5, 16, 33):
        for p in (0.0, 0.002, 0.02, 0.3, 1.0):
            for window in (0, 1, block - 1, block, block + 1, 2 * block - 1, 3 * block + 5, 1000 * block):
                docs = torch.cumsum((torch.rand(n * block, generator=g) < p).int(), 0).int()
                any_, full = block_classes(docs, window, block)
                part = any_ & ~full
                for w in (window, torch.tensor(window, dtype=torch.int32)):
                    sp = block_spans(docs, w, block)
                    assert torch.equal(_spans_dense(sp["kv_num_blocks"], sp["kv_indices"], n), part)
                    assert torch.equal(_spans_dense(sp["full_kv_num_blocks"], sp["full_kv_indices"], n), full)
                    assert torch.equal(_spans_dense(sp["q_num_blocks"], sp["q_indices"], n), part.T)
                    assert torch.equal(_spans_dense(sp["full_q_num_blocks"], sp["full_q_indices"], n), full.T)
                    assert all(int(t.min()) >= 0 and int(t.max()) < n for k, t in sp.items() if "indices" in k)


@pytest.mark.parametrize("window", [0, 200, 1000])
def test_flex_block_mask_matches_torch_construction(window):
    """Our BlockMask (kv and q orientations) lists the same blocks as torch's from_kv_blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    g = torch.Generator().manual_seed(window)
    T, B = 1024, 128
    docs = torch.cumsum((torch.rand(T, generator=g) < 0.004).int(), 0).int()
    ours = flex_block_mask(docs, window, B)
    any_, full = block_classes(docs, window, B)
    a = lambda m: torch.argsort(m.int(), dim=-1, descending=True, stable=True).int()[None, None]  # noqa: E731
    n = lambda m: m.sum(-1).int()[None, None]  # noqa: E731
    ref = BlockMask.from_kv_blocks(n(any_ & ~full), a(any_ & ~full), n(full), a(full), BLOCK_SIZE=B,
                                   mask_mod=ours.mask_mod)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    for name, cnt in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks"),
                      ("q_indices", "q_num_blocks"), ("full_q_indices", "full_q_num_blocks")):
        k = getattr(ref, cnt)[0, 0]  # only the first `count` entries of a row are read
        for r in range(k.numel()):
            assert torch.equal(getattr(ours, name)[0, 0, r, :k[r]].sort().values,
                               getattr(ref, name)[0, 0, r, :k[r]].sort().values), name
    assert ours.seq_lengths == ref.seq_lengths and ours.BLOCK_SIZE == ref.BLOCK_SIZE
    assert torch.equal(ours.to_dense(), ref.to_dense())


def test_flex_block_mask_traces_to_index_arithmetic_only():
    """A sort inside the compiled forward became 1–5 MB Triton kernels that dominated a cold
    compile on GPU; the scatter that replaced it failed Inductor's Triton codegen from 256 blocks
    on, and the searchsorted after it at 32–96 blocks (torch 2.11, benchmarks/gpu_mask_check.py):
    the mask must trace to comparisons, reductions and pointwise ops (checked on the aten graph)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    ops: list[str] = []

    def backend(gm, example_inputs):
        def record(g, _):
            ops.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return g
        return aot_module_simplified(gm, example_inputs, fw_compiler=record)

    def fields(docs, window):
        m = flex_block_mask(docs, window, 128)
        return m.kv_indices, m.q_indices, m.full_kv_indices, m.full_q_indices

    docs = torch.cumsum((torch.arange(1024) % 300 == 0).int(), 0).int()
    torch._dynamo.reset()
    torch.compile(fields, backend=backend, fullgraph=True, dynamic=False)(docs, torch.tensor(200))
    assert ops and not [o for o in ops if "sort" in o or "scatter" in o or "cumsum" in o], ops
    assert [o for o in ops if "sum" in o]


def test_dense_mask_rules():
    docs = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    m = dense_mask(docs, 2)
    assert m[2, 0] and not m[3, 2]  # other document
    assert not m[0, 1]  # causal
    assert m[6, 4] and not m[6, 3]  # window: q − k ≤ 2 (and 3 is the same doc but too far)


@pytest.mark.parametrize("T,window", [(256, 40), (300, 100), (1000, 250), (130, 500)])
def test_backends_agree_with_reference(T, window):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(T, 2, 32, generator=g) for _ in range(3))
    docs = torch.cumsum((torch.rand(T, generator=g) < 0.01).int(), 0).int()
    ref = reference_attention(q, k, v, docs, window, 0.12)
    for backend in ("sdpa", "flex"):
        y = attend(q, k, v, build_mask(docs, window, backend), backend, 0.12)
        torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)


def test_model_flex_and_sdpa_agree_on_cpu():
    torch.manual_seed(0)
    sd = _randomize(GPT(TINY)).state_dict()
    flex_cfg = apply_overrides(load_config("tiny"), {"model.attn_backend": "flex"}).model
    losses = []
    for mcfg in (TINY, flex_cfg):
        m = GPT(mcfg)
        m.load_state_dict(sd)
        m.eval()
        with torch.no_grad():
            losses.append(m(*_batch(T=500), 96, 48).item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    assert losses[0] > math.log(512) * 0.5  # a real, non-trivial loss


def test_document_masking_isolates_documents():
    """Changing document 0 must not change attention outputs inside document 1."""
    g = torch.Generator().manual_seed(1)
    T = 200
    q, k, v = (torch.randn(T, 2, 16, generator=g) for _ in range(3))
    docs = torch.zeros(T, dtype=torch.int32)
    docs[120:] = 1
    y1 = attend(q, k, v, build_mask(docs, 500, "sdpa"), "sdpa", 0.2)
    k2, v2 = k.clone(), v.clone()
    k2[:120] += 1.0
    v2[:120] -= 1.0
    y2 = attend(q, k2, v2, build_mask(docs, 500, "sdpa"), "sdpa", 0.2)
    torch.testing.assert_close(y1[120:], y2[120:])
    assert not torch.allclose(y1[:120], y2[:120])


# -- rotary / YaRN ---------------------------------------------------------------------------
def test_yarn_attn_scale_sequence_and_reset():
    r = Rotary(head_dim=128, rope_freqs=32, min_freq=1 / 1024, attn_scale=0.1, alpha=1.0, beta=32.0)
    base = r.omega.clone()
    assert base[0] == 1.0 and base[31] == pytest.approx(1 / 1024) and (base[32:] == 0).all()
    scales = [r.attn_scale]
    for old, new in ((3, 7), (7, 11), (11, 13)):
        r.extend(old * 128, new * 128)
        scales.append(r.attn_scale)
    assert scales == pytest.approx([0.1, 0.1170, 0.1275, 0.1318], abs=1e-4)
    assert r.omega[0] == base[0]  # high frequencies (many rotations per window) kept
    assert r.omega[31] < base[31] / 4  # lowest frequency interpolated by ≈ 3/13
    assert (r.omega[32:] == 0).all()
    r.reset()
    assert r.attn_scale == 0.1 and torch.equal(r.omega, base)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_rotary_is_relative(dtype, rel):
    """q·k depends on the offset only, up to the tables' rounding (bf16 in the records: ~1e-2)."""
    r = Rotary(head_dim=32, rope_freqs=8, min_freq=1 / 1024, attn_scale=0.1, alpha=1.0, beta=32.0, dtype=dtype)
    cos, sin = r.cos_sin(64, torch.device("cpu"))
    assert cos.dtype == sin.dtype == dtype
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g)
    Q, K = apply_rotary(q.expand(64, 1, 32), cos, sin), apply_rotary(k.expand(64, 1, 32), cos, sin)
    s1 = (Q[10] * K[3]).sum()
    s2 = (Q[50] * K[43]).sum()
    assert s1.item() == pytest.approx(s2.item(), rel=rel)
    torch.testing.assert_close(apply_rotary(q, cos[:1], sin[:1]), q)  # position 0: identity


# -- FP8 head ----------------------------------------------------------------------------------
def test_fp8_only_on_capable_gpus():
    assert not fp8_supported(torch.device("cpu"))  # the trainer falls back to bf16 on CPU


def _fp8_vs_bf16(dev):
    cfg = apply_overrides(load_config("tiny"), {"model.fp8_head": True}).model
    torch.manual_seed(0)
    m = _randomize(GPT(cfg)).to(dev)
    inputs, targets, docs = (t.to(dev) for t in _batch(T=512))
    ref = m(inputs, targets, docs, 64, 32)
    ref.backward()
    g_ref = m.lm_head.grad.float().clone()
    m.zero_grad(set_to_none=True)
    m.fp8 = True
    out = m(inputs, targets, docs, 64, 32)
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)
    for g in (m.lm_head.grad, m.blocks[1].attn.qkvo_w.grad):
        assert torch.isfinite(g).all()
    cos = torch.nn.functional.cosine_similarity(m.lm_head.grad.float().flatten(), g_ref.flatten(), dim=0)
    assert cos > 0.98


def test_fp8_head_math_on_cpu():
    """torch._scaled_mm also runs on CPU in recent PyTorch: check the FP8 head's forward/backward."""
    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("no torch._scaled_mm")
    _fp8_vs_bf16(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_head_close_to_bf16_on_gpu():
    dev = torch.device("cuda")
    if not fp8_supported(dev):
        pytest.skip("GPU lacks FP8 _scaled_mm (needs compute capability ≥ 8.9)")
    _fp8_vs_bf16(dev)


def test_flex_forward_is_one_graph_for_every_window():
    """The trainer passes windows (and the YaRN scale) as tensors on the flex path, so a window
    change reuses the compiled graph; before, each window value cost a cold recompile on GPU."""
    from torch._dynamo.testing import CompileCounter

    cfg = load_config("tiny", {"model.attn_backend": "flex"})
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    for p in model.parameters():  # non-zero output projections, so the window changes the loss
        torch.nn.init.normal_(p, std=0.05)
    T = 512
    x, y = torch.randint(0, 500, (T,)), torch.randint(0, 500, (T,))
    docs = torch.cumsum((torch.rand(T) < 0.01).int(), 0)
    counter = CompileCounter()
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=counter)
    losses = []
    with torch.no_grad():
        for w in (32, 64, 96):
            got = compiled(x, y, docs, torch.tensor(w), torch.tensor(w // 2))
            want = model(x, y, docs, w, w // 2)
            assert torch.allclose(got, want, atol=1e-4), (w, got, want)
            losses.append(float(got))
            model.rotary.extend(w, w + 32)
    assert counter.frame_count == 1
    assert len(set(losses)) == 3


# -- issue 16: record numerics and model knobs, each against a hand formula ------------------------
def _record_yarn_tables(head_dim, T, windows, block=128):
    """The records' Yarn (reset + apply per window increase), transcribed: fp32 frequencies
    (1/1024)^linspace(0, 1, head_dim/4) plus head_dim/4 zeros, YaRN update in fp32, and bf16
    cos/sin tables of θ = t·ω."""
    freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
    freq = torch.cat([freq, freq.new_zeros(head_dim // 4)])
    scale = 0.1
    for old, new in zip(windows, windows[1:]):
        rotations = block * old * freq / (2 * torch.pi)
        s = old / new
        w = torch.clamp((rotations - 1) / (32 - 1), 0, 1)
        freq *= s + w * (1 - s)
        scale *= 0.2 * math.log(new / old) + 1
    theta = torch.outer(torch.arange(T, dtype=torch.float32), freq)
    return theta.cos().to(torch.bfloat16), theta.sin().to(torch.bfloat16), scale


def _record_rotary(x, cos, sin):
    """The records' `rotary` on (T, H, D) bf16 (their (B, T, H, D) without B)."""
    cos, sin = cos[:x.size(0), None, :], sin[:x.size(0), None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), -1)


@pytest.mark.parametrize("windows", [(3,), (3, 7, 11, 13)], ids=["base", "after-yarn"])
def test_bf16_rope_equals_the_records_formula(windows):
    """model.rope_dtype=bf16 (every preset): tables and rotation bit-identical to the records'
    Yarn + rotary, also after the YaRN extensions; fp32 tables differ from them."""
    T, hd = 2048, 128
    r = Rotary(hd, 32, 1 / 1024, 0.1, 1.0, 32.0, attn_factor=0.2, dtype=torch.bfloat16)
    for old, new in zip(windows, windows[1:]):
        r.extend(old * 128, new * 128)
    cos, sin = r.cos_sin(T, torch.device("cpu"))
    rc, rs, scale = _record_yarn_tables(hd, T, windows)
    assert torch.equal(cos[:, 0], rc) and torch.equal(sin[:, 0], rs)
    assert r.attn_scale == pytest.approx(scale, rel=1e-12)
    q = torch.randn(T, 6, hd, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(apply_rotary(q, cos, sin), _record_rotary(q, rc, rs))
    r32 = Rotary(hd, 32, 1 / 1024, 0.1, 1.0, 32.0, dtype=torch.float32)
    for old, new in zip(windows, windows[1:]):
        r32.extend(old * 128, new * 128)
    c32, s32 = r32.cos_sin(T, torch.device("cpu"))
    assert not torch.equal(apply_rotary(q, c32, s32), _record_rotary(q, rc, rs))


def test_rope_dtype_reaches_the_model():
    cfgs = {d: apply_overrides(load_config("tiny"), {"model.rope_dtype": d}).model for d in ("bf16", "fp32")}
    assert load_config("speedrun").model.rope_dtype == "bf16"
    losses = {}
    for d, c in cfgs.items():
        torch.manual_seed(0)
        m = _randomize(GPT(c)).eval()
        assert m.rotary.cos_sin(4, torch.device("cpu"))[0].dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[d]
        with torch.no_grad():
            losses[d] = m(*_batch(), 64, 32).item()
    assert losses["bf16"] != losses["fp32"]


@pytest.mark.parametrize("factor", [0.0, 0.2, 0.5])
def test_yarn_attn_factor(factor):
    """attn_scale ×= factor·ln(new/old) + 1 per extension; 0 keeps the base scale."""
    cfg = apply_overrides(load_config("tiny"), {"model.yarn_attn_factor": factor}).model
    m = GPT(cfg)
    m.rotary.extend(16, 64)
    want = cfg.attn_scale_init * (factor * math.log(4) + 1)
    assert m.rotary.attn_scale == pytest.approx(want) and float(m.rotary.attn_scale_t) == pytest.approx(want)


def test_qk_norm_knob():
    """With QK-norm, scaling W_q and W_k by 3 changes nothing (RMS-norm removes it; all-fp32 model so
    that bf16 rounding does not blur it: measured 1e-6); without, the loss moves (measured 1.6e-3)."""
    inputs, targets, docs = _batch()
    fp32 = {f"model.param_dtype.{f}": "fp32" for f in ("attn_gate", "smear_gate", "embed", "value_embed", "head")}
    out = {}
    for on in (True, False):
        cfg = apply_overrides(load_config("tiny"), {"model.qk_norm": on, "model.rope_dtype": "fp32", **fp32}).model
        torch.manual_seed(0)
        m = _randomize(GPT(cfg)).eval()
        with torch.no_grad():
            m.lm_head.normal_(0, 0.5)
            a = m(inputs, targets, docs, 64, 32).item()
            for b in m.blocks:
                if b.attn is not None:
                    d = b.attn.d
                    b.attn.qkvo_w.view(4, d, d)[:2].mul_(3.0)
            out[on] = (a, m(inputs, targets, docs, 64, 32).item())
    assert abs(out[True][0] - out[True][1]) < 1e-5
    assert abs(out[False][0] - out[False][1]) > 3e-4


@pytest.mark.parametrize("act,fn", [("relu2", lambda h: torch.relu(h) ** 2), ("gelu", torch.nn.functional.gelu),
                                    ("silu", torch.nn.functional.silu), ("relu", torch.relu)])
def test_mlp_activation_knob(act, fn):
    from trainer.model import MLP

    cfg = apply_overrides(load_config("tiny"), {"model.mlp_activation": act}).model
    torch.manual_seed(0)
    mlp = MLP(cfg)
    torch.nn.init.normal_(mlp.c_proj, std=0.1)
    x = torch.randn(5, cfg.model_dim)
    want = fn(x @ mlp.c_fc.t()) @ mlp.c_proj  # tall: linear(x, c_fc), linear(h, c_projᵀ)
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)


def test_fp8_scales_reach_the_fp8_matmul(monkeypatch):
    """model.fp8_*_scale are the scales handed to the FP8 head; x_s = 0 means the records' √d/448."""
    from trainer import model as model_mod

    seen = []

    def fake_apply(x, w, x_s, w_s, g_s):
        seen.append((x_s, w_s, g_s))
        return torch.nn.functional.linear(x, w.type_as(x))

    monkeypatch.setattr(model_mod._FP8Linear, "apply", staticmethod(fake_apply))
    base = apply_overrides(load_config("tiny"), {"model.fp8_head": True})
    for over, want in (({}, (64 ** 0.5 / 448, 2 ** -9, 1 / 448)),
                       ({"model.fp8_x_scale": 0.5, "model.fp8_w_scale": 0.25, "model.fp8_grad_scale": 0.125},
                        (0.5, 0.25, 0.125))):
        m = GPT(apply_overrides(base, over).model)
        m.fp8 = True
        m(*_batch(T=64), 64, 32)
        assert seen[-1] == pytest.approx(want)


def test_param_dtype_knob():
    """model.param_dtype.<family>: storage dtype; the init draws are the same numbers rounded."""
    torch.manual_seed(0)
    ref = GPT(TINY)
    cfg = apply_overrides(load_config("tiny"), {"model.param_dtype.attn": "bf16", "model.param_dtype.embed": "fp32",
                                                "model.param_dtype.head": "fp32"}).model
    torch.manual_seed(0)
    m = GPT(cfg)
    assert m.blocks[1].attn.qkvo_w.dtype == torch.bfloat16 and ref.blocks[1].attn.qkvo_w.dtype == torch.float32
    assert torch.equal(m.blocks[1].attn.qkvo_w, ref.blocks[1].attn.qkvo_w.bfloat16())
    assert m.embed.weight.dtype == torch.float32 and ref.embed.weight.dtype == torch.bfloat16
    assert m.lm_head.dtype == torch.float32 and m.smear_gate.dtype == torch.bfloat16
    loss = _randomize(m)(*_batch(), 64, 32)  # fp32 activations (embedding dtype) run end to end
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_precomputed_rotary_tables_equal_the_computed_ones_through_yarn_steps():
    """The cos/sin tables kept as buffers (Rotary.precompute) are the values cos_sin computes, for
    every prefix length, after each YaRN extension and after reset; longer sequences still work."""
    from trainer.attention import Rotary

    def fresh():
        return Rotary(64, 16, 1 / 1024, 0.12, 1.0, 32.0, attn_factor=0.2, dtype=torch.bfloat16)

    r, ref = fresh(), fresh()
    r.precompute(300)
    table = r.cos_table
    for step in [None, (384, 896), (896, 1664), "reset", (384, 1664)]:
        if step == "reset":
            r.reset()
            ref.reset()
        elif step is not None:
            r.extend(*step)
            ref.extend(*step)
        for T in (1, 128, 300):
            got, want = r.cos_sin(T, torch.device("cpu")), ref.cos_sin(T, torch.device("cpu"))
            assert got[0].shape == want[0].shape == (T, 1, 32)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (step, T)
        assert r.cos_table is table  # refreshed in place: a compiled graph keeps its tensors
    long = r.cos_sin(301, torch.device("cpu"))  # beyond the table: computed
    assert torch.equal(long[0], ref.cos_sin(301, torch.device("cpu"))[0])
    r.precompute(300)
    assert r.cos_table is table


def test_the_trainer_precomputes_the_longest_forward():
    from trainer.presets import load_config
    from trainer.train import longest_forward

    cfg = load_config("speedrun")
    ref = cfg.runtime.reference_world_size
    assert longest_forward(cfg) == max(max(cfg.schedule.train_bs_schedule), cfg.schedule.train_bs_extension,
                                       cfg.eval.val_batch_size) // ref
    assert longest_forward(cfg) >= 393216 // 8


def test_a_kept_model_adopts_a_run_with_longer_batches():
    """A long-lived worker keeps the model across runs of the same model config; another run's
    batch or eval size changes the rotary tables' length, which _adopt must follow (copying the
    buffers as they were failed on the shape)."""
    from trainer.model import GPT
    from trainer.presets import load_config
    from trainer.train import _adopt

    cfg = load_config("tiny")
    torch.manual_seed(0)
    kept = GPT(cfg.model)
    kept.rotary.precompute(64)
    kept.rotary.extend(32, 64)  # the kept model ended its last run YaRN-extended
    torch.manual_seed(1)
    fresh = GPT(cfg.model)
    fresh.rotary.precompute(96)
    _adopt(kept, fresh)
    assert kept.rotary.cos_table.shape[0] == 96
    assert torch.equal(kept.rotary.cos_table, fresh.rotary.cos_table)
    assert torch.equal(kept.rotary.sin_table, fresh.rotary.sin_table)
    assert all(torch.equal(a, b) for a, b in zip(kept.parameters(), fresh.parameters()))
    table = kept.rotary.cos_table
    _adopt(kept, fresh)  # same length: refreshed in place, the same tensor (no recompile)
    assert kept.rotary.cos_table is table

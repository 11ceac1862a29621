"""NorMuon on one process (CPU): normalization axis, variance-norm math, cautious WD, LR rules.

    python -m pytest tests/trainer/test_normuon.py -q
"""
from __future__ import annotations

import math

import pytest
import torch

from trainer.presets import load_config
from trainer.normuon import (
    NorMuon, apply_update, plan_groups, reduction_dim, shape_lr_mult, stored_transposed, variance_normalize,
)
from trainer.polar import POLAR_COEFFS, POLAR_SETS, polar_express

D, H, GC = 16, 2, 4  # model_dim, heads, gate channels of the small test model


def stored_shapes(layout: str, d: int = D, heads: int = H, gc: int = GC) -> dict[str, tuple[int, int]]:
    tall = layout == "tall"
    big = (4 * d, d) if tall else (d, 4 * d)
    return {"attn": big, "mlp_up": big, "mlp_down": big, "attn_gate": (heads, gc), "smear_gate": (1, gc)}


def cfg_with(**over):
    base = {"optim.muon.polar_backend": "torch"}
    base.update(over)
    return load_config("tiny", overrides=base)


def make_params(layout: str, seed: int = 0, families=("attn", "mlp_up", "mlp_down", "attn_gate", "smear_gate")):
    g = torch.Generator().manual_seed(seed)
    shapes = stored_shapes(layout)
    out = []
    for f in families:
        p = torch.nn.Parameter(torch.randn(shapes[f], generator=g) * 0.1)
        p.grad = torch.randn(shapes[f], generator=g)
        out.append((f, p))
    return out


# --------------------------------------------------------------------------------------------
# Normalization axis (trainer-spec §1d)
# --------------------------------------------------------------------------------------------
# Axis settings (optim.muon.orientation) of the records, and the 10-27 rule as a setting.
ORIENT = {
    "12-11": {"attn_qkv": "output", "attn_o": "output", "mlp_up": "output", "mlp_down": "input",
              "attn_gate": "output", "smear_gate": "output"},
    "10-27": {"attn_qkv": "input", "attn_o": "input", "mlp_up": "output", "mlp_down": "input",
              "attn_gate": "input", "smear_gate": "input"},
    "shape": dict.fromkeys(["attn_qkv", "attn_o", "mlp_up", "mlp_down", "attn_gate", "smear_gate"], "shape"),
}
FAMS = ("attn", "mlp_up", "mlp_down", "attn_gate", "smear_gate")
# (layout, axes) → family → expected dim on the stored matrix (d = 768, 6 heads, 12 channels).
EXPECTED_DIM = {
    ("tall", "12-11"): {"attn": -1, "mlp_up": -1, "mlp_down": -1, "attn_gate": -1, "smear_gate": -1},  # 12-11
    ("wide", "10-27"): {"attn": -2, "mlp_up": -2, "mlp_down": -2, "attn_gate": -2, "smear_gate": -2},  # 10-27
    ("tall", "10-27"): {"attn": -2, "mlp_up": -1, "mlp_down": -1, "attn_gate": -2, "smear_gate": -2},
    ("wide", "12-11"): {"attn": -1, "mlp_up": -2, "mlp_down": -2, "attn_gate": -1, "smear_gate": -1},
    ("tall", "shape"): {"attn": -1, "mlp_up": -1, "mlp_down": -1, "attn_gate": -2, "smear_gate": -2},
    ("wide", "shape"): {"attn": -2, "mlp_up": -2, "mlp_down": -2, "attn_gate": -2, "smear_gate": -2},
}


def _dim(family, layout, axes, d=768):
    shape = stored_shapes(layout, d, 6, 12)[family]
    axis = ORIENT[axes]["attn_qkv" if family == "attn" else family]
    return reduction_dim(axis, shape, stored_transposed(family, layout))


@pytest.mark.parametrize("layout,axes", list(EXPECTED_DIM))
@pytest.mark.parametrize("family", FAMS)
def test_reduction_dim_table(layout, axes, family):
    assert _dim(family, layout, axes) == EXPECTED_DIM[(layout, axes)][family]


def test_presets_carry_the_records_axes():
    for preset, axes in (("speedrun", "12-11"), ("speedrun-1027", "10-27")):
        o = load_config(preset).optim.muon.orientation
        assert {k: getattr(o, k) for k in ORIENT[axes]} == ORIENT[axes], preset
    # The 10-27 axes are its shape rule on its wide storage, family by family.
    for f in FAMS:
        assert EXPECTED_DIM[("wide", "10-27")][f] == EXPECTED_DIM[("wide", "shape")][f]


def test_reduction_axis_meaning_in_both_records():
    """Spec §1d in words: the MLP is normalized per hidden unit in both records (either storage);
    attention per output channel in 12-11 and per input channel in 10-27; attn gate per head (12-11)
    vs per input channel (10-27); smear gate one statistic (12-11) vs one per entry (10-27)."""
    d = 768

    def kept(family, layout, axes):  # number of statistics per matrix = length of the kept axis
        shape = (d, d) if family == "attn" else stored_shapes(layout, d, 6, 12)[family]
        return shape[-2] if _dim(family, layout, axes) == -1 else shape[-1]

    for layout in ("tall", "wide"):
        for axes in ("12-11", "10-27"):
            assert kept("mlp_up", layout, axes) == 4 * d  # hidden units
            assert kept("mlp_down", layout, axes) == 4 * d
    # Attention blocks are (out, in); 12-11 keeps rows (out), 10-27 keeps columns (in).
    assert reduction_dim("output", (4 * d, d)) == -1 and reduction_dim("input", (d, 4 * d)) == -2
    assert kept("attn_gate", "tall", "12-11") == 6 and kept("attn_gate", "wide", "10-27") == 12
    assert kept("smear_gate", "tall", "12-11") == 1 and kept("smear_gate", "wide", "10-27") == 12
    with pytest.raises(ValueError, match="'output', 'input' or 'shape'"):
        reduction_dim("neuron", (4, 4))


def _orient(axes):
    return {f"optim.muon.orientation.{k}": v for k, v in ORIENT[axes].items()}


@pytest.mark.parametrize("layout,axes", list(EXPECTED_DIM))
def test_buffer_shapes_and_values_after_a_step(layout, axes):
    """After one step from zero state with momentum 0 (u = g), each second-moment buffer is
    (1−β2)·mean(V², red_dim) of V = polar_express(g) (attention per d×d block)."""
    cfg = cfg_with(**{"model.weight_layout": layout, "optim.muon.second_moment_dtype": "fp32", **_orient(axes)})
    params = make_params(layout)
    grads = {f: p.grad.clone() for f, p in params}
    opt = NorMuon(params, cfg, 0, 1)
    opt.step(lr_mult=1.0, momentum=0.0)
    bufs = {b["families"][0]: b for b in opt.buffers()}
    assert set(bufs) == set(FAMS)
    beta2 = cfg.optim.muon.beta2
    for f, b in bufs.items():
        shape = stored_shapes(layout)[f]
        dim = EXPECTED_DIM[(layout, axes)][f]
        assert b["red_dim"] == dim
        mats = (4, D, D) if f == "attn" else (1,) + shape
        expect_shape = list(mats)
        expect_shape[dim] = 1
        assert tuple(b["second"].shape) == tuple(expect_shape), f
        V = polar_express(grads[f].reshape(mats), backend="torch").float()
        torch.testing.assert_close(b["second"], (1 - beta2) * V.square().mean(dim=dim, keepdim=True),
                                   rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Variance-norm math
# --------------------------------------------------------------------------------------------
def test_variance_normalize_hand_example():
    """V = [[1, 1], [2, 0]], per-row, β2 = 0.5, zero buffer: ms = [1, 2], buf = [0.5, 1],
    V·buf^-½ = [[√2, √2], [2, 0]] (‖‖² = 8), ‖V‖² = 6 → out = √(6/8)·[[√2, √2], [2, 0]]."""
    V = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    buf = torch.zeros(1, 2, 1)
    out = variance_normalize(V.clone(), buf, beta2=0.5, red_dim=-1)
    torch.testing.assert_close(buf, torch.tensor([[[0.5], [1.0]]]))
    r = math.sqrt(6 / 8)
    torch.testing.assert_close(out, torch.tensor([[[math.sqrt(2) * r, math.sqrt(2) * r], [2 * r, 0.0]]]))


@pytest.mark.parametrize("red_dim", [-1, -2])
def test_variance_normalize_restores_norm_and_equalizes_rms(red_dim):
    torch.manual_seed(0)
    V = torch.randn(3, 12, 20) * torch.rand(3, 12, 1) * torch.rand(3, 1, 20)  # uneven rows/cols
    stat = [3, 12, 20]
    stat[red_dim] = 1
    buf = torch.zeros(stat)
    out = variance_normalize(V.clone(), buf, beta2=0.0, red_dim=red_dim)  # β2 = 0: buf = ms now
    torch.testing.assert_close(out.norm(dim=(-2, -1)), V.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    rms = out.square().mean(dim=red_dim)  # one value per kept row (or column)
    torch.testing.assert_close(rms, rms.mean(dim=-1, keepdim=True).expand_as(rms), rtol=1e-4, atol=0)
    # The EMA: a second call with β2 = 0.9 moves the buffer 10% toward the new mean-square.
    before = buf.clone()
    V2 = torch.randn(3, 12, 20)
    variance_normalize(V2.clone(), buf, beta2=0.9, red_dim=red_dim)
    torch.testing.assert_close(buf, 0.9 * before + 0.1 * V2.square().mean(dim=red_dim, keepdim=True))


def test_variance_normalize_bf16_mean_close_to_fp32():
    torch.manual_seed(1)
    V = torch.randn(2, 16, 32).bfloat16()
    a = variance_normalize(V.clone(), torch.zeros(2, 16, 1), 0.95, -1, fp32=True)
    b = variance_normalize(V.clone(), torch.zeros(2, 16, 1), 0.95, -1, fp32=False)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["tall", "wide"])
def test_variance_norm_off_gives_plain_polar_update(layout):
    """With normalization, WD and momentum off, Δp = −lr·mult·polar(g) exactly (per d×d block for
    attention), with mult the tall/wide rule × lr_mul from the stored shape."""
    cfg = cfg_with(**{"model.weight_layout": layout, "optim.muon.variance_norm.attn": False,
                      "optim.muon.variance_norm.mlp": False, "optim.muon.variance_norm.gates": False,
                      "optim.muon.weight_decay": 0.0, "optim.muon.lr": 0.05})
    params = make_params(layout)
    before = {f: p.detach().clone() for f, p in params}
    grads = {f: p.grad.clone() for f, p in params}
    opt = NorMuon(params, cfg, 0, 1)
    assert all(b["second"] is None for b in opt.buffers())
    opt.step(lr_mult=0.5, momentum=0.0)
    lr = 0.05 * 0.5
    tall = layout == "tall"
    mult = {"attn": 2.0 if tall else 1.0, "mlp_up": 2.0 if tall else 1.0, "mlp_down": 4.0 if tall else 2.0,
            "attn_gate": 1.0, "smear_gate": 1.0}  # tiny preset: lr_mul mlp_down = 2
    for f, p in params:
        g = grads[f].reshape(4, D, D) if f == "attn" else grads[f]
        V = polar_express(g, backend="torch").float().reshape(p.shape)
        torch.testing.assert_close(p.detach(), before[f] - lr * mult[f] * V, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Cautious weight decay and LR rules
# --------------------------------------------------------------------------------------------
def test_apply_update_cautious_mask_hand_example():
    """p = [[1, −1], [2, −2]], V = [[1, 1], [−1, −1]]: V⊙p = [[1, −1], [−2, 2]] so the mask keeps
    entries (0,0) and (1,1). lr = 0.1, wd = 0.5: p − 0.5·M⊙p − 0.1·V = [[0.4, −1.1], [2.1, −0.9]]."""
    p = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    V = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])
    one = torch.ones(1, 1, 1)
    out = apply_update(p.clone(), V, one, one, torch.tensor(0.1), torch.tensor(0.5), cautious=True)
    torch.testing.assert_close(out, torch.tensor([[[0.4, -1.1], [2.1, -0.9]]]))
    # Not cautious: every entry decays.
    out = apply_update(p.clone(), V, one, one, torch.tensor(0.1), torch.tensor(0.5), cautious=False)
    torch.testing.assert_close(out, 0.5 * p - 0.1 * V)
    # Zero entries of p and V count as "same sign" (mask ≥ 0) but decay nothing.
    z = apply_update(torch.zeros(1, 1, 2), torch.tensor([[[0.0, 1.0]]]), one, one, torch.tensor(0.1),
                     torch.tensor(0.5), cautious=True)
    torch.testing.assert_close(z, torch.tensor([[[0.0, -0.1]]]))
    # Per-matrix slot multipliers broadcast over the stack.
    p2 = torch.ones(2, 1, 1)
    V2 = torch.ones(2, 1, 1)
    out = apply_update(p2.clone(), V2, torch.tensor([1.0, 3.0]).view(2, 1, 1), torch.tensor([2.0, 4.0]).view(2, 1, 1),
                       torch.tensor(0.1), torch.tensor(0.01), cautious=True)
    torch.testing.assert_close(out.flatten(), torch.tensor([1 - 0.02 - 0.1, 1 - 0.04 - 0.3]))


def _smear_expected(p: torch.Tensor, g: torch.Tensor, lr_eff: float, decay: float, cautious: bool) -> torch.Tensor:
    """Hand result for the smear gate (a 1×k row, momentum 0 so u = g): V = polar_express(g), and
    the single per-row statistic makes the variance normalization a no-op after norm restoration.
    In exact arithmetic V = s·g/‖g‖ with s = p5∘…∘p1(1/1.02) ≈ 0.904; a rank-one input sits at the
    top of the polynomial's band, where bf16 rounding moves s to about 1.11 (still in [0.86, 1.14])."""
    V = polar_express(g, backend="torch").float()
    s = 1 / 1.02
    for a, b, c in POLAR_COEFFS:
        s = a * s + b * s ** 3 + c * s ** 5
    torch.testing.assert_close(V, s * g / g.norm(), rtol=0.25, atol=0)
    mask = ((V * p) >= 0).float() if cautious else torch.ones_like(p)
    return p - decay * mask * p - lr_eff * V


@pytest.mark.parametrize("preset_form", ["12-11", "10-27"])
def test_smear_gate_step_end_to_end(preset_form):
    """One whole step on the smear gate against the hand formula, in both WD forms:
    12-11 cautious, decay = wd·lr·wd_mul·lr_eff; 10-27 p·(1 − wd·wd_mul), not cautious."""
    lr, lr_mult, wd = 0.2, 0.5, 3.0
    over = {"optim.muon.lr": lr, "optim.muon.weight_decay": wd, "optim.lr_mul.smear_gate": 1.5,
            "optim.wd_mul.smear_gate": 2.0}
    if preset_form == "10-27":
        over.update({"optim.muon.cautious_wd": False, "optim.muon.wd_lr_scaled": False, "optim.muon.weight_decay": 0.1})
        wd = 0.1
    cfg = cfg_with(**over)
    p = torch.nn.Parameter(torch.tensor([[0.5, -0.5, 1.0, -1.0, 0.25, 0.0]]))
    p.grad = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 0.5]])
    p0, g0 = p.detach().clone(), p.grad.clone()
    NorMuon([("smear_gate", p)], cfg, 0, 1).step(lr_mult=lr_mult, momentum=0.0)
    lr_eff = lr * lr_mult * 1.5  # (1, k) is wide: shape multiplier 1
    if preset_form == "12-11":
        exp = _smear_expected(p0, g0, lr_eff, wd * (lr * lr_mult) * 2.0 * lr_eff, cautious=True)
    else:
        exp = _smear_expected(p0, g0, lr_eff, wd * 2.0, cautious=False)
    torch.testing.assert_close(p.detach(), exp, rtol=1e-6, atol=1e-7)
    # The mask matters: entries 0 and 3 have V and p of the same sign, entry 1 does not.
    if preset_form == "12-11":
        no_mask = _smear_expected(p0, g0, lr_eff, wd * (lr * lr_mult) * 2.0 * lr_eff, cautious=False)
        assert (no_mask - exp).abs().max() > 0.05


def _speedrun_params(preset: str):
    cfg = load_config(preset)
    d, m = cfg.model.model_dim, cfg.model
    big = (4 * d, d) if m.weight_layout == "tall" else (d, 4 * d)
    shapes = {"attn": big, "mlp_up": big, "mlp_down": big, "attn_gate": (m.num_heads, m.gate_channels),
              "smear_gate": (1, m.gate_channels)}
    return cfg, [(f, torch.nn.Parameter(torch.zeros(s))) for f, s in shapes.items()]


@pytest.mark.parametrize("preset,expected", [
    ("speedrun", {"attn": 2.0, "mlp_up": 2.0, "mlp_down": 4.0, "attn_gate": 1.0, "smear_gate": 1.0}),
    ("speedrun-1027", {"attn": 1.0, "mlp_up": 2.0, "mlp_down": 1.0, "attn_gate": 1.0, "smear_gate": 1.0}),
])
def test_tall_lr_rule_multipliers_of_the_records(preset, expected):
    """lr_eff/lr = max(1, rows/cols)^½ (stored shape) · lr_mul: 12-11 attn ×2, c_fc ×2, c_proj ×4;
    10-27 attn ×1, c_fc ×2, c_proj ×1. The decay multiplier is wd_mul·that (LR-scaled, 12-11) or
    wd_mul (10-27)."""
    cfg, params = _speedrun_params(preset)
    opt = NorMuon(params, cfg, 0, 1)
    got = {b["families"][0]: b for b in opt.buffers()}
    for f, mult in expected.items():
        assert got[f]["lr_slot"] == pytest.approx([mult]), f
        wd_expect = mult if cfg.optim.muon.wd_lr_scaled else 1.0
        assert got[f]["wd_slot"] == pytest.approx([wd_expect]), f


def test_shape_lr_mult():
    assert shape_lr_mult((3072, 768)) == 2.0
    assert shape_lr_mult((768, 3072)) == 1.0
    assert shape_lr_mult((3072, 768), tall_lr_rule=False) == 1.0
    assert shape_lr_mult((6, 12)) == 1.0


# --------------------------------------------------------------------------------------------
# Grouping, state, edge cases
# --------------------------------------------------------------------------------------------
def _record_families():
    fams, shapes = ["smear_gate"], [(1, 12)]
    for layer in range(1, 12):
        if layer != 7:
            fams += ["attn", "attn_gate"]
            shapes += [(3072, 768), (6, 12)]
        fams += ["mlp_up", "mlp_down"]
        shapes += [(3072, 768), (3072, 768)]
    return fams, shapes


def test_record_groups_on_8_ranks():
    fams, shapes = _record_families()
    groups = plan_groups(fams, shapes, 8, custom_groups_8=True)
    assert [len(g) for g in groups] == [1, 10, 16, 16]
    g3 = [fams[i] for i in groups[2]]
    chunk = 2  # ceil(16 / 8)
    for r in range(8):
        mine = set(g3[r * chunk:(r + 1) * chunk])
        assert mine == ({"attn"} if r < 5 else {"mlp_up", "mlp_down"}), r  # ranks 0–4 attention
    assert all(fams[i] in ("mlp_up", "mlp_down") for i in groups[3])
    # Other world sizes, or the switch off: one group per family, small groups first.
    for ws, custom in ((8, False), (4, True), (1, True)):
        groups = plan_groups(fams, shapes, ws, custom_groups_8=custom)
        assert [fams[g[0]] for g in groups] == ["smear_gate", "attn_gate", "attn", "mlp_up", "mlp_down"]
        assert [len(g) for g in groups] == [1, 10, 10, 11, 11]


def test_reset_and_state_dict_roundtrip():
    cfg = cfg_with()
    params = make_params("tall", seed=3)
    grads = [p.grad.clone() for _, p in params]
    opt = NorMuon(params, cfg, 0, 1)
    opt.step(1.0, 0.9)
    sd = opt.state_dict()
    snap = [p.detach().clone() for _, p in params]
    opt.step(1.0, 0.9)
    after_two = [p.detach().clone() for _, p in params]
    # Restore params and state, step again: identical result.
    for (_, p), s, g in zip(params, snap, grads):
        p.data.copy_(s)
        p.grad = g.clone()
    opt.load_state_dict(sd)
    opt.step(1.0, 0.9)
    for (_, p), a in zip(params, after_two):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)
    opt.reset()
    assert all(float(g.momentum.abs().sum()) == 0 for g in opt.groups)
    assert all(float(b["second"].abs().sum()) == 0 for b in opt.buffers())
    with pytest.raises(ValueError, match="sharded per rank"):
        opt.load_state_dict({**sd, "world_size": 2})


def test_missing_grad_is_zero_and_bad_params_rejected():
    cfg = cfg_with()
    params = make_params("tall", seed=4, families=("mlp_up",))
    p = params[0][1]
    p.grad = None
    before = p.detach().clone()
    NorMuon(params, cfg, 0, 1).step(1.0, 0.9)
    assert torch.isfinite(p).all()
    # Zero update: only the (cautious, mask all-true) decay acts: p·(1 − wd·lr·lr_eff).
    lr = cfg.optim.muon.lr
    torch.testing.assert_close(p.detach(), before * (1 - 1.2 * lr * lr * 2.0))
    with pytest.raises(ValueError, match="not \\(4d, d\\)"):
        NorMuon([("attn", torch.nn.Parameter(torch.zeros(10, 4)))], cfg, 0, 1)
    with pytest.raises(ValueError, match="NorMuon family"):
        NorMuon([("embed", torch.nn.Parameter(torch.zeros(4, 4)))], cfg, 0, 1)


def test_record_layout_runs_per_rank():
    """World size 8 (constructed per rank, no step): in group 3 ranks 0–4 hold 2 attention
    matrices as one (8, d, d) block batch; ranks 5–7 hold 2 MLP matrices, c_fc and c_proj mixed
    in one batch with their own LR multipliers (2 and 4 in 12-11)."""
    d = 16
    fams, _ = _record_families()
    shapes = {"attn": (4 * d, d), "mlp_up": (4 * d, d), "mlp_down": (4 * d, d), "attn_gate": (6, 12),
              "smear_gate": (1, 12)}
    params = [(f, torch.nn.Parameter(torch.zeros(shapes[f]))) for f in fams]
    cfg = cfg_with()
    for r in range(8):
        opt = NorMuon(params, cfg, r, 8)
        assert [g.chunk for g in opt.groups] == [1, 2, 2, 2]
        runs = opt.buffers()
        fam_sets = [set(b["families"]) for b in runs]
        if r == 0:
            assert fam_sets[:2] == [{"smear_gate"}, {"attn_gate"}]
        group3 = [b for b in runs if b["families"][0] in ("attn",)] if r < 5 else None
        if r < 5:
            assert len(group3) == 1 and tuple(group3[0]["second"].shape) == (8, d, 1)
            assert group3[0]["lr_slot"] == pytest.approx([2.0, 2.0])
        mlp_runs = [b for b in runs if b["families"][0] != "attn" and "gate" not in b["families"][0]]
        # group 4 always holds 2 MLP matrices; group 3 adds 2 more on ranks 5–7
        assert sum(len(b["families"]) for b in mlp_runs) == (2 if r < 5 else 4)
        for b in mlp_runs:
            expect = [2.0 if f == "mlp_up" else 4.0 for f in b["families"]]
            assert b["lr_slot"] == pytest.approx(expect)
            assert tuple(b["second"].shape) == (len(b["families"]), 4 * d, 1)


def test_nesterov_momentum_over_two_steps():
    """m ← μ·m + (1−μ)·g; u = (1−μ)·g + μ·m (Nesterov via lerp). Normalization and WD off, so
    step 2 moves p by −lr_eff·polar(u2) with u2 = (1−μ²)·g2 + μ²(1−μ)·g1 by hand. Plain momentum
    (u = m) would weight g1:g2 as 0.9:1 instead of 0.81:1.9 and fail."""
    cfg = cfg_with(**{"optim.muon.variance_norm.mlp": False, "optim.muon.weight_decay": 0.0})
    params = make_params("tall", seed=5, families=("mlp_up",))
    p = params[0][1]
    g1 = p.grad.clone()
    g2 = torch.randn(p.shape, generator=torch.Generator().manual_seed(9))
    opt = NorMuon(params, cfg, 0, 1)
    mu = 0.9
    opt.step(1.0, mu)
    p1 = p.detach().clone()
    p.grad = g2.clone()
    opt.step(1.0, mu)
    u2 = (1 - mu * mu) * g2 + mu * mu * (1 - mu) * g1
    lr_eff = cfg.optim.muon.lr * 2.0  # tall (4d, d): ×2, lr_mul mlp_up 1
    expect = p1 - lr_eff * polar_express(u2, backend="torch").float()
    # u2 by hand and by lerp differ in fp32 rounding, which can flip a bf16 rounding inside Polar
    # Express: allow 1% of the update.
    torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-2 * lr_eff)
    assert (p.detach() - p1).abs().max() > 0.1 * lr_eff


# --------------------------------------------------------------------------------------------
# Knobs of issue 16: W_O axis, second-moment dtype, Polar Express sets, dtype-aware grouping
# --------------------------------------------------------------------------------------------
def _hand_normalize(V: torch.Tensor, red_dim: int, beta2: float) -> torch.Tensor:
    """One NorMuon normalization from a zero buffer, per matrix of V (..., R, C), in float64."""
    V = V.double()
    ms = V.square().mean(dim=red_dim, keepdim=True)
    s = ((1 - beta2) * ms).rsqrt()
    out = V * s
    return out * (V.norm(dim=(-2, -1), keepdim=True) / out.norm(dim=(-2, -1), keepdim=True))


@pytest.mark.parametrize("attn_o", ["input", "output"])
def test_w_o_axis_is_its_own_knob(attn_o):
    """optim.muon.orientation.attn_o moves only W_O's statistics: Q/K/V stay per output channel
    (per row of each d×d block), W_O goes per head dimension (per column) with "input". The step
    equals the hand formula block by block, and the two settings give different updates."""
    lr = 0.05
    cfg = cfg_with(**{"optim.muon.orientation.attn_o": attn_o, "optim.muon.weight_decay": 0.0,
                      "optim.muon.lr": lr})
    params = make_params("tall", seed=7, families=("attn",))
    p = params[0][1]
    p0, g = p.detach().clone(), p.grad.clone()
    opt = NorMuon(params, cfg, 0, 1)
    opt.step(lr_mult=1.0, momentum=0.0)
    (b,) = opt.buffers()
    beta2 = cfg.optim.muon.beta2
    V = polar_express(g.reshape(4, D, D), backend="torch").float()
    if attn_o == "input":
        assert (b["red_dim"], b["red_dim_o"]) == (-1, -2)
        assert {k: tuple(v.shape) for k, v in b["seconds"].items()} == {"qkv": (1, 3, D, 1), "o": (1, 1, 1, D)}
        torch.testing.assert_close(b["seconds"]["o"][0, 0], (1 - beta2) * V[3].square().mean(dim=-2, keepdim=True))
    else:  # the records: one (4k, d, d) batch on one axis
        assert (b["red_dim"], b["red_dim_o"]) == (-1, -1) and set(b["seconds"]) == {"all"}
    o_dim = -2 if attn_o == "input" else -1
    want = torch.cat([_hand_normalize(V[:3], -1, beta2), _hand_normalize(V[3:], o_dim, beta2)])
    # lr_eff = lr · 2 (tall (4d, d) storage) · lr_mul 1; bf16 V → compare at bf16 resolution
    torch.testing.assert_close(p.detach(), (p0 - 2 * lr * want.reshape(p.shape)).float(), rtol=0, atol=2 * lr * 1e-2)
    other = cfg_with(**{"optim.muon.orientation.attn_o": "output" if attn_o == "input" else "input",
                        "optim.muon.weight_decay": 0.0, "optim.muon.lr": lr})
    q = torch.nn.Parameter(p0.clone())
    q.grad = g.clone()
    NorMuon([("attn", q)], other, 0, 1).step(lr_mult=1.0, momentum=0.0)
    assert (q.detach() - p.detach()).abs().max() > 0.05 * lr


def _record_variance_reduction(v, buf, beta2, red_dim):
    """The 12-11 record's compiled NorMuon helper, transcribed formula by formula (eager)."""
    v_mean = v.float().square().mean(dim=red_dim, keepdim=True)
    d = v.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * d).sqrt()
    buf.lerp_(v_mean.to(dtype=buf.dtype), 1 - beta2)
    step_size = buf.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * d) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return v.mul_((step_size * (v_norm / v_norm_new.clamp_min(1e-10))).type_as(v))


@pytest.mark.parametrize("buf_dtype", [torch.bfloat16, torch.float32])
def test_variance_normalize_equals_the_record_helper(buf_dtype):
    """Bit for bit over 5 EMA steps, for the record's bf16 gate buffer and its fp32 matrix buffer."""
    g = torch.Generator().manual_seed(3)
    ours, rec = torch.zeros(10, 6, 1, dtype=buf_dtype), torch.zeros(10, 6, 1, dtype=buf_dtype)
    for _ in range(5):
        V = torch.randn(10, 6, 12, generator=g).bfloat16()
        a = variance_normalize(V.clone(), ours, 0.95, -1)
        b = _record_variance_reduction(V.clone(), rec, 0.95, -1)
        assert torch.equal(a, b) and torch.equal(ours, rec)


def test_gate_second_moment_dtype_follows_the_knob():
    """"param" (records): the bf16 gates keep a bf16 EMA, the fp32 matrices an fp32 one; "fp32":
    all fp32. The bf16 EMA is what the record computes (previous test); it differs from fp32."""
    shapes = stored_shapes("tall")

    def run(second_dtype):
        params = []
        for f in ("attn_gate", "smear_gate", "mlp_up"):
            p = torch.nn.Parameter((torch.randn(shapes[f], generator=torch.Generator().manual_seed(1)) * 0.1)
                                   .to(torch.float32 if f == "mlp_up" else torch.bfloat16))
            params.append((f, p))
        opt = NorMuon(params, cfg_with(**{"optim.muon.second_moment_dtype": second_dtype}), 0, 1)
        for step in range(4):
            for f, p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + step)).to(p.dtype)
            opt.step(1.0, 0.9)
        return opt, params

    rec, p_rec = run("param")
    f32, p_f32 = run("fp32")
    dt = {b["families"][0]: b["second"].dtype for b in rec.buffers()}
    assert dt == {"attn_gate": torch.bfloat16, "smear_gate": torch.bfloat16, "mlp_up": torch.float32}
    assert {b["second"].dtype for b in f32.buffers()} == {torch.float32}
    gate_rec = next(b["second"] for b in rec.buffers() if b["families"][0] == "attn_gate")
    gate_f32 = next(b["second"] for b in f32.buffers() if b["families"][0] == "attn_gate")
    assert not torch.equal(gate_rec.float(), gate_f32)  # the knob reaches the EMA ...
    torch.testing.assert_close(gate_rec.float(), gate_f32, rtol=2e-2, atol=0)  # ... at bf16 resolution


@pytest.mark.parametrize("name", ["pe-4", "pe-3"])
def test_polar_coeffs_set_reaches_the_update(name):
    """optim.muon.polar_coeffs: the step uses the named set (Δp = −lr_eff·polar(g; set) with
    normalization and WD off), not the first k steps of the record's list."""
    over = {"optim.muon.variance_norm.mlp": False, "optim.muon.weight_decay": 0.0, "optim.muon.polar_coeffs": name}
    cfg = cfg_with(**over)
    params = make_params("tall", seed=6, families=("mlp_up",))
    p = params[0][1]
    p0, g = p.detach().clone(), p.grad.clone()
    NorMuon(params, cfg, 0, 1).step(1.0, 0.0)
    lr_eff = cfg.optim.muon.lr * 2.0
    want = polar_express(g, coeffs=POLAR_SETS[name], backend="torch").float()
    torch.testing.assert_close(p.detach(), p0 - lr_eff * want, rtol=0, atol=1e-6)
    k = len(POLAR_SETS[name])
    truncated = polar_express(g, coeffs=POLAR_COEFFS[:k], backend="torch").float()
    assert (truncated - want).abs().max() > 1e-2


def test_groups_split_by_dtype():
    """The record's 8-rank grouping stacks attention and MLP matrices in one buffer: only if they
    share a dtype (model.param_dtype); otherwise one group per (family, shape, dtype)."""
    fams, shapes = _record_families()
    same = plan_groups(fams, shapes, 8, True, [torch.float32] * len(fams))
    assert [len(x) for x in same] == [1, 10, 16, 16]
    dtypes = [torch.bfloat16 if f == "attn" else torch.float32 for f in fams]
    split = plan_groups(fams, shapes, 8, True, dtypes)
    assert [len(x) for x in split] == [1, 10, 10, 11, 11]

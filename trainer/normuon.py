"""NorMuon: sharded Nesterov momentum → Polar Express → variance normalization → cautious update.

The optimizer of the hidden matrices and gates (families attn, mlp_up, mlp_down, attn_gate,
smear_gate), following trainer-spec §2.1 with every record difference behind a config field:

    from trainer.normuon import NorMuon
    opt = NorMuon([("attn", qkvo_w), ("mlp_up", c_fc), ...], cfg, rank, world_size)
    opt.step(lr_mult=get_lr(step), momentum=get_momentum(step))
    python -m pytest tests/trainer/test_normuon.py tests/trainer/test_sharded_step.py -q

Sharding: parameters are grouped (one group per family, or the record's [1, 10, 16, 16] layout
on 8 ranks), each group is stacked and padded to ceil(n/W)·W slots, and rank r updates the
contiguous chunk of slots [r·c, (r+1)·c). All gradient reduce-scatters are launched before any
compute; the all-gathers of the updated chunks are awaited at the end of `step()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from trainer.comm import all_gather_into, reduce_scatter_avg
from trainer.config import MUON_FAMILIES
from trainer.polar import coefficients, polar_express

if TYPE_CHECKING:
    from trainer.config import TrainConfig

GROUP_ORDER = ("smear_gate", "attn_gate", "attn", "mlp_up", "mlp_down")  # small groups first
RECORD_GROUPS_8 = (1, 10, 16, 16)  # smear | attn gates | 10 attn + 6 mlp | 16 mlp
MIN_SECOND_MOMENT = 1e-10


# --------------------------------------------------------------------------------------------
# Pure rules (tested directly)
# --------------------------------------------------------------------------------------------
def stored_transposed(family: str, weight_layout: str) -> bool:
    """Whether the stored matrix is the transpose of the layer's F.linear weight (out × in):
    c_fc is used as c_fcᵀ in the wide layout, c_proj as c_projᵀ in the tall one. Attention
    blocks (viewed (4, d, d)) and gates are used as stored in both layouts."""
    return (family == "mlp_up" and weight_layout == "wide") or (family == "mlp_down" and weight_layout == "tall")


def reduction_dim(axis: str, stored_shape: tuple[int, ...], transposed: bool = False) -> int:
    """Dim (-1: one statistic per stored row, -2: per stored column) of NorMuon's mean-square.

    axis (optim.muon.orientation.<family>, trainer-spec §1d): "output" keeps one statistic per
    output unit of the layer (a row of its F.linear weight), "input" one per input unit;
    `transposed` says the stored matrix is that weight transposed. "shape" is the 10-27 rule on
    the stored matrix: per row iff rows ≥ cols (for attention, the whole stored qkvo shape).
    """
    if axis == "shape":
        return -1 if stored_shape[-2] >= stored_shape[-1] else -2
    if axis not in ("output", "input"):
        raise ValueError(f"orientation axis={axis!r} is invalid: expected 'output', 'input' or 'shape'")
    per_row = (axis == "output") != transposed
    return -1 if per_row else -2


def shape_lr_mult(stored_shape: tuple[int, ...], tall_lr_rule: bool = True) -> float:
    """max(1, rows/cols)^½ of the stored shape (the tall-matrix rule), or 1 when the rule is off."""
    if not tall_lr_rule:
        return 1.0
    rows, cols = stored_shape[-2], stored_shape[-1]
    return max(1.0, rows / cols) ** 0.5


def attn_block_dim(stored_shape: tuple[int, ...]) -> int:
    """d of an attention weight stored (4d, d) or (d, 4d); ValueError for any other shape."""
    rows, cols = stored_shape[-2], stored_shape[-1]
    d = min(rows, cols)
    if max(rows, cols) != 4 * d:
        raise ValueError(f"attn parameter of shape {tuple(stored_shape)} is not (4d, d) or (d, 4d); "
                         "NorMuon splits it into Q, K, V, O blocks of d×d")
    return d


def variance_normalize(V: Tensor, buf: Tensor, beta2: float, red_dim: int, fp32: bool = True) -> Tensor:
    """NorMuon normalization of V (..., R, C) in place, updating the EMA `buf` in place.

    ms = mean over red_dim of V²; buf ← β2·buf + (1−β2)·ms; V ← V·buf^-½, then the whole matrix
    is rescaled to its Frobenius norm before the normalization (norm restoration). Both squared
    norms are computed from ms: ‖V‖² = d·Σ ms and ‖V·s‖² = Σ (d·ms)·s².

    The EMA and s = buf^-½ are computed in the buffer's dtype, as the 12-11 record does: its
    buffer has the parameter's dtype, bf16 for the gates (optim.muon.second_moment_dtype).
    """
    d = V.shape[red_dim]
    ms = (V.float() if fp32 else V).square().mean(dim=red_dim, keepdim=True).float()
    norm_sq = ms.sum(dim=(-2, -1), keepdim=True) * d
    buf.lerp_(ms.to(buf.dtype), 1.0 - beta2)
    scale = buf.clamp_min(MIN_SECOND_MOMENT).rsqrt().float()
    new_sq = ((ms * d) * scale.square()).sum(dim=(-2, -1), keepdim=True)
    factor = scale * (norm_sq.sqrt() / new_sq.sqrt().clamp_min(MIN_SECOND_MOMENT))
    return V.mul_(factor.to(V.dtype))


def apply_update(p: Tensor, V: Tensor, lr_slot: Tensor, wd_slot: Tensor, lr: Tensor, wd: Tensor,
                 cautious: bool) -> Tensor:
    """p ← p − (wd·wd_slot)·M⊙p − (lr·lr_slot)·V, in place; M = [V⊙p ≥ 0] if cautious else 1.

    lr_slot / wd_slot are per-matrix multipliers broadcast over (k, 1, 1); lr / wd are 0-d
    (CPU) tensors so a compiled version does not recompile when the schedule moves them.
    The decay uses the parameter before the update.
    """
    pf = p.float()
    Vf = V.float()
    decay = wd.float() * wd_slot
    if cautious:
        decay = decay * ((Vf * pf) >= 0).to(pf.dtype)
    new = pf - decay * pf - (lr.float() * lr_slot) * Vf
    return p.copy_(new.to(p.dtype))


_COMPILED: dict[str, Callable] = {}


def _fast(fn: Callable, on: Tensor) -> Callable:
    """torch.compile(fn) on CUDA tensors (compiled on first use), the eager fn elsewhere."""
    if not on.is_cuda:
        return fn
    c = _COMPILED.get(fn.__name__)
    if c is None:
        c = _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False, fullgraph=True)
    return c


def plan_groups(families: list[str], shapes: list[tuple[int, ...]], world_size: int,
                custom_groups_8: bool = True, dtypes: list[torch.dtype] | None = None) -> list[list[int]]:
    """Indices of the parameters in each NorMuon group, in processing order.

    The record's [1, 10, 16, 16] layout (smear gate | 10 attention gates | 10 attn + 6 mlp |
    16 mlp) when world_size is 8, custom_groups_8 is on, the counts are exactly 1/10/10/22 and
    attn and mlp share one stored shape (and dtype); otherwise one group per (family, shape,
    dtype), small first.
    """
    dtypes = dtypes or [torch.float32] * len(families)
    by_fam: dict[str, list[int]] = {f: [] for f in GROUP_ORDER}
    for i, f in enumerate(families):
        if f not in by_fam:
            raise ValueError(f"family={f!r} is not a NorMuon family; expected one of {', '.join(MUON_FAMILIES)}")
        by_fam[f].append(i)
    mlp = [i for i, f in enumerate(families) if f in ("mlp_up", "mlp_down")]
    mats = by_fam["attn"] + mlp
    if (world_size == 8 and custom_groups_8 and len(by_fam["smear_gate"]) == 1
            and len(by_fam["attn_gate"]) == 10 and len(by_fam["attn"]) == 10 and len(mlp) == 22
            and len({(shapes[i], dtypes[i]) for i in mats}) == 1
            and len({(shapes[i], dtypes[i]) for i in by_fam["attn_gate"]}) == 1):
        return [by_fam["smear_gate"], by_fam["attn_gate"], mats[:16], mats[16:]]
    groups: list[list[int]] = []
    for f in GROUP_ORDER:
        by_shape: dict[tuple, list[int]] = {}
        for i in by_fam[f]:
            by_shape.setdefault((tuple(shapes[i]), dtypes[i]), []).append(i)
        groups.extend(by_shape.values())
    return groups


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------
@dataclass
class _Norm:
    """One variance normalization of a run: over all of its matrices, or (attention with different
    Q/K/V and W_O axes) over the Q, K, V blocks or the O blocks of its (k, 4, d, d) view."""

    blocks: str  # "all" | "qkv" | "o"
    red_dim: int
    second: Tensor  # EMA of the mean-square: (k', R, 1) or (k', 1, C), or (k, 3|1, ...) per block kind


@dataclass
class _Run:
    """Consecutive local slots [lo, hi) processed together (same reshape, axes, normalization)."""

    lo: int
    hi: int
    attn_d: int  # d for attention (viewed as (4k, d, d)); 0 for plain matrices
    red_dim: int  # Q/K/V blocks for attention
    red_dim_o: int  # W_O blocks for attention; = red_dim otherwise
    normalize: bool
    lr_slot: Tensor  # (k, 1, 1) fp32: shape multiplier · lr_mul per matrix
    wd_slot: Tensor  # (k, 1, 1) fp32: wd_mul (· lr_slot when LR-scaled) per matrix
    norms: list[_Norm] = field(default_factory=list)  # empty when normalization is off


@dataclass
class _Group:
    params: list[torch.nn.Parameter]
    families: list[str]
    shape: tuple[int, int]
    dtype: torch.dtype
    chunk: int  # slots per rank
    lo: int  # first global slot of this rank
    count: int  # real (non-padding) slots of this rank
    momentum: Tensor  # (chunk, R, C)
    runs: list[_Run] = field(default_factory=list)


class NorMuon:
    """Sharded NorMuon over (family, param) pairs; see the module docstring and trainer-spec §2.1."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], cfg: "TrainConfig",
                 rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"NorMuon: rank={rank} / world_size={world_size} are inconsistent")
        self.cfg = cfg
        self.mcfg = cfg.optim.muon
        self.coeffs = coefficients(self.mcfg.polar_coeffs)
        self.rank, self.world_size = rank, world_size
        families = [f for f, _ in params]
        shapes = []
        for f, p in params:
            if p.dim() != 2:
                raise ValueError(f"NorMuon: {f} parameter of shape {tuple(p.shape)} must be 2-D")
            if f == "attn":
                attn_block_dim(tuple(p.shape))
            shapes.append(tuple(p.shape))
        self.groups: list[_Group] = []
        for idx in plan_groups(families, shapes, world_size, self.mcfg.custom_groups_8, [p.dtype for _, p in params]):
            if idx:
                self.groups.append(self._make_group([params[i] for i in idx]))

    # -- construction ------------------------------------------------------------------------
    def _make_group(self, members: list[tuple[str, torch.nn.Parameter]]) -> _Group:
        fams = [f for f, _ in members]
        ps = [p for _, p in members]
        shape = tuple(ps[0].shape)
        dtypes = {p.dtype for p in ps}
        if len({tuple(p.shape) for p in ps}) != 1 or len(dtypes) != 1:
            raise ValueError(f"NorMuon group {sorted(set(fams))} mixes shapes/dtypes "
                             f"{sorted({tuple(p.shape) for p in ps})} / {sorted(map(str, dtypes))}")
        n, W = len(ps), self.world_size
        chunk = -(-n // W)
        lo = self.rank * chunk
        count = max(0, min(n, lo + chunk) - lo)
        dev = ps[0].device
        g = _Group(params=ps, families=fams, shape=shape, dtype=ps[0].dtype, chunk=chunk, lo=lo,
                   count=count, momentum=torch.zeros((chunk,) + shape, dtype=ps[0].dtype, device=dev))
        m, o = self.mcfg, self.cfg.optim
        vn = {"attn": m.variance_norm.attn, "mlp_up": m.variance_norm.mlp, "mlp_down": m.variance_norm.mlp,
              "attn_gate": m.variance_norm.gates, "smear_gate": m.variance_norm.gates}
        layout = self.cfg.model.weight_layout
        ax = m.orientation

        def key_of(f: str) -> tuple[bool, int, int, bool]:
            if f == "attn":
                return True, reduction_dim(ax.attn_qkv, shape), reduction_dim(ax.attn_o, shape), vn[f]
            r = reduction_dim(getattr(ax, f), shape, stored_transposed(f, layout))
            return False, r, r, vn[f]

        second_dtype = g.dtype if m.second_moment_dtype == "param" else torch.float32
        i = 0
        while i < count:
            key = key_of(fams[lo + i])
            j = i + 1
            while j < count and key_of(fams[lo + j]) == key:
                j += 1
            slot_fams = fams[lo + i:lo + j]
            smult = shape_lr_mult(shape, m.tall_lr_rule)
            lr_s = [smult * getattr(o.lr_mul, sf) for sf in slot_fams]
            wd_s = [getattr(o.wd_mul, sf) * (mult if m.wd_lr_scaled else 1.0) for sf, mult in zip(slot_fams, lr_s)]
            run = _Run(lo=i, hi=j, attn_d=attn_block_dim(shape) if key[0] else 0, red_dim=key[1],
                       red_dim_o=key[2], normalize=key[3],
                       lr_slot=torch.tensor(lr_s, dtype=torch.float32, device=dev).view(-1, 1, 1),
                       wd_slot=torch.tensor(wd_s, dtype=torch.float32, device=dev).view(-1, 1, 1))
            if run.normalize:
                k, d = j - i, run.attn_d
                if not d:
                    parts = [("all", (k,) + shape, run.red_dim)]
                elif run.red_dim == run.red_dim_o:  # the records: Q, K, V and O in one (4k, d, d) batch
                    parts = [("all", (4 * k, d, d), run.red_dim)]
                else:
                    parts = [("qkv", (k, 3, d, d), run.red_dim), ("o", (k, 1, d, d), run.red_dim_o)]
                for blocks, mats, red in parts:
                    stat = list(mats)
                    stat[red] = 1
                    run.norms.append(_Norm(blocks, red, torch.zeros(stat, dtype=second_dtype, device=dev)))
            g.runs.append(run)
            i = j
        return g

    # -- step --------------------------------------------------------------------------------
    def _stacked_grads(self, g: _Group) -> Tensor:
        zero = None
        rows = []
        for p in g.params:
            if p.grad is None:
                zero = zero if zero is not None else torch.zeros(g.shape, dtype=g.dtype, device=p.device)
                rows.append(zero)
            else:
                rows.append(p.grad.to(g.dtype))
        pad = g.chunk * self.world_size - len(g.params)
        if pad:
            zero = zero if zero is not None else torch.zeros(g.shape, dtype=g.dtype, device=g.params[0].device)
            rows.extend([zero] * pad)
        return torch.stack(rows)

    @torch.no_grad()
    def step(self, lr_mult: float, momentum: float) -> None:
        """One NorMuon step at lr = muon.lr·lr_mult with momentum μ; params updated on all ranks."""
        m = self.mcfg
        lr = m.lr * float(lr_mult)
        mu = float(momentum)
        lr_t = torch.tensor(lr, dtype=torch.float32)
        # decay per step: wd·lr·wd_mul·lr_eff = (wd·lr²)·(wd_mul·lr_slot) when LR-scaled, else wd·wd_mul
        wd_t = torch.tensor(m.weight_decay * (lr * lr if m.wd_lr_scaled else 1.0), dtype=torch.float32)
        pending = [reduce_scatter_avg(self._stacked_grads(g), self.world_size) for g in self.groups]
        gathers: list[tuple[_Group, Tensor, Any]] = []
        for g, (grad_chunk, work) in zip(self.groups, pending):
            if work is not None:
                work.wait()
            k = g.count
            upd = torch.stack([p.detach() for p in g.params[g.lo:g.lo + k]]) if k else None
            if k:
                buf = g.momentum[:k]
                gk = grad_chunk[:k]
                buf.lerp_(gk, 1.0 - mu)
                u = gk.lerp(buf, mu)  # Nesterov: (1−μ)·g + μ·m
                for run in g.runs:
                    self._update_run(run, u[run.lo:run.hi], upd[run.lo:run.hi], lr_t, wd_t)
            if self.world_size == 1:
                for p, new in zip(g.params, upd):
                    p.copy_(new)
                continue
            send = torch.zeros((g.chunk,) + g.shape, dtype=g.dtype, device=g.momentum.device)
            if k:
                send[:k].copy_(upd)
            full = torch.empty((g.chunk * self.world_size,) + g.shape, dtype=g.dtype, device=send.device)
            gathers.append((g, full, all_gather_into(full, send)))
        for g, full, work in gathers:
            if work is not None:
                work.wait()
            for p, new in zip(g.params, full):
                p.copy_(new)

    def _update_run(self, run: _Run, u: Tensor, p: Tensor, lr_t: Tensor, wd_t: Tensor) -> None:
        """Polar Express → variance normalization → cautious update of the stacked params p (k, R, C)."""
        m = self.mcfg
        k, d = run.hi - run.lo, run.attn_d
        x = u.reshape(4 * k, d, d) if d else u
        V = polar_express(x, coeffs=self.coeffs, backend=m.polar_backend)
        norm = _fast(variance_normalize, V)
        for n in run.norms:
            if n.blocks == "all":
                V = norm(V, n.second, m.beta2, n.red_dim, m.norm_fp32)
            else:  # Q/K/V and W_O blocks on different axes: normalize each kind on its own
                V4 = V.view(k, 4, d, d)
                sel = slice(0, 3) if n.blocks == "qkv" else slice(3, 4)
                V4[:, sel] = norm(V4[:, sel].contiguous(), n.second, m.beta2, n.red_dim, m.norm_fp32)
        V = V.reshape(p.shape)
        _fast(apply_update, p)(p, V, run.lr_slot, run.wd_slot, lr_t, wd_t, m.cautious_wd)

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the momentum and second-moment buffers (after the kernel warmup)."""
        for g in self.groups:
            g.momentum.zero_()
            for run in g.runs:
                for n in run.norms:
                    n.second.zero_()

    def state_dict(self) -> dict:
        """Copies of this rank's buffers (safe to keep across later steps)."""
        return {
            "rank": self.rank, "world_size": self.world_size,
            "momentum": [g.momentum.clone() for g in self.groups],
            "second": [[[n.second.clone() for n in r.norms] for r in g.runs] for g in self.groups],
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("world_size") != self.world_size or sd.get("rank") != self.rank:
            raise ValueError(f"NorMuon state from rank {sd.get('rank')}/{sd.get('world_size')} cannot load "
                             f"into rank {self.rank}/{self.world_size}: the state is sharded per rank")
        if len(sd["momentum"]) != len(self.groups):
            raise ValueError(f"NorMuon state has {len(sd['momentum'])} groups, this optimizer {len(self.groups)}")
        for g, mom, sec in zip(self.groups, sd["momentum"], sd["second"]):
            if mom.shape != g.momentum.shape or len(sec) != len(g.runs):
                raise ValueError(f"NorMuon state does not match group of shape {g.shape}: "
                                 f"momentum {tuple(mom.shape)} vs {tuple(g.momentum.shape)}")
            g.momentum.copy_(mom)
            for run, bufs in zip(g.runs, sec):
                if len(bufs) != len(run.norms) or any(b.shape != n.second.shape for b, n in zip(bufs, run.norms)):
                    raise ValueError("NorMuon state second-moment buffers do not match this configuration")
                for b, n in zip(bufs, run.norms):
                    n.second.copy_(b)

    # -- introspection (tests, logs) -----------------------------------------------------------
    def buffers(self) -> list[dict[str, Any]]:
        """Per local run: families, red_dim (Q/K/V for attention), red_dim_o (W_O), and the
        second-moment buffers: `second` the first one (None when off), `seconds` {blocks: buffer}."""
        out = []
        for g in self.groups:
            for run in g.runs:
                out.append({"families": g.families[g.lo + run.lo:g.lo + run.hi], "stored_shape": g.shape,
                            "red_dim": run.red_dim, "red_dim_o": run.red_dim_o,
                            "second": run.norms[0].second if run.norms else None,
                            "seconds": {n.blocks: n.second for n in run.norms},
                            "lr_slot": run.lr_slot.flatten().tolist(), "wd_slot": run.wd_slot.flatten().tolist()})
        return out


__all__ = ["NorMuon", "reduction_dim", "stored_transposed", "shape_lr_mult", "variance_normalize", "apply_update",
           "plan_groups", "attn_block_dim"]

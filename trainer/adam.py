"""DistAdam: row-sharded Adam for the embeddings, value embeddings, lm_head and scalars.

trainer-spec §2.3. Each rank keeps exp_avg / exp_avg_sq (optim.adam.state_dtype, bf16 in the
records) for its rows [r·n/W, (r+1)·n/W) only; gradients arrive through an averaging
reduce-scatter and updated rows leave through an all-gather. A parameter whose dim 0 does not
split over the ranks (a gate moved to Adam by optim.optimizer, e.g. the 1×12 smear gate) is
replicated instead: its gradient is all-reduced and every rank updates all of it, as upstream's
DistAdam does for small parameters from 2025-12-21 on. The step uses the record's eps placement:

    p ← p − lr_p·(√(1−β2^t)/(1−β1^t))·m/(√v + eps)        lr_p = adam.lr·lr_mult·lr_mul[family]

    from trainer.adam import DistAdam
    opt = DistAdam([("embed", emb.weight), ("scalars", scalars), ...], cfg, rank, world_size)
    opt.step(lr_mult=get_lr(step))
    python -m pytest tests/trainer/test_adam.py -q

Stepping only on odd steps (adam.every_other_step) is the train loop's business.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trainer.comm import all_gather_into, all_reduce_avg, reduce_scatter_avg
from trainer.config import ADAM_FAMILIES, FAMILIES

if TYPE_CHECKING:
    from trainer.config import TrainConfig

_COMPILED: dict[str, Any] = {}


def adam_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float, eps: float,
                lr: Tensor, step_size: Tensor, decay: Tensor) -> None:
    """One in-place Adam update of a row shard (the record's formula, trainer-spec §2.3).

    p ← p·(1 − decay); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g² (stored in m/v's dtype);
    p ← p − lr·step_size·m/(√v + eps) with step_size = √(1−β2^t)/(1−β1^t).
    lr / step_size / decay are 0-d (CPU) tensors so a compiled version never recompiles.
    """
    gf = g.float()
    m.copy_((m.float() * beta1 + gf * (1.0 - beta1)).to(m.dtype))
    v.copy_((v.float() * beta2 + gf.square() * (1.0 - beta2)).to(v.dtype))
    pf = p.float() * (1.0 - decay.float())
    upd = m.float() / (v.float().sqrt() + eps)
    p.copy_((pf - (lr.float() * step_size.float()) * upd).to(p.dtype))


def _fast(on: Tensor):
    if not on.is_cuda:
        return adam_update
    c = _COMPILED.get("adam")
    if c is None:
        c = _COMPILED["adam"] = torch.compile(adam_update, dynamic=False, fullgraph=True)
    return c


class DistAdam:
    """Row-sharded Adam over (family, param) pairs: embed / value_embed / scalars / head, and any
    NorMuon family that optim.optimizer moves to Adam."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], cfg: "TrainConfig",
                 rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"DistAdam: rank={rank} / world_size={world_size} are inconsistent")
        self.cfg = cfg
        self.acfg = cfg.optim.adam
        self.rank, self.world_size = rank, world_size
        self.families: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.exp_avg: list[Tensor] = []
        self.exp_avg_sq: list[Tensor] = []
        self.replicated: list[bool] = []  # dim 0 not divisible by world_size: all-reduce, full update
        state_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self.acfg.state_dtype]
        for fam, p in params:
            if fam not in FAMILIES:
                raise ValueError(f"DistAdam: family={fam!r} is invalid; expected one of {', '.join(FAMILIES)}")
            if p.dim() == 0:
                raise ValueError(f"DistAdam: {fam} parameter must have at least one dimension")
            rep = p.shape[0] % world_size != 0
            if rep and fam in ADAM_FAMILIES:  # the model pads these; a remainder is a bug upstream of here
                raise ValueError(f"DistAdam: {fam} parameter of shape {tuple(p.shape)} needs dim 0 divisible "
                                 f"by world_size={world_size}; pad it (vocab to a multiple of 128, "
                                 "scalars with the world-size pad)")
            rows = p.shape[0] if rep else p.shape[0] // world_size
            shard = (rows,) + tuple(p.shape[1:])
            self.families.append(fam)
            self.params.append(p)
            self.replicated.append(rep)
            self.exp_avg.append(torch.zeros(shard, dtype=state_dtype, device=p.device))
            self.exp_avg_sq.append(torch.zeros(shard, dtype=state_dtype, device=p.device))
        self.t = 0  # Adam steps taken (bias correction); half the training steps when alternating

    def _shard(self, p: Tensor, replicated: bool = False) -> Tensor:
        if replicated:
            return p.data
        rows = p.shape[0] // self.world_size
        return p.data[self.rank * rows:(self.rank + 1) * rows]

    @torch.no_grad()
    def step(self, lr_mult: float) -> None:
        """One Adam step at lr = adam.lr·lr_mult·lr_mul[family]; params updated on all ranks."""
        a, o = self.acfg, self.cfg.optim
        b1, b2 = a.betas
        pending = []
        for p, rep in zip(self.params, self.replicated):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            pending.append((all_reduce_avg if rep else reduce_scatter_avg)(g, self.world_size))
        self.t += 1
        step_size = torch.tensor((1.0 - b2 ** self.t) ** 0.5 / (1.0 - b1 ** self.t), dtype=torch.float32)
        gathers = []
        for fam, p, rep, m, v, (g, work) in zip(self.families, self.params, self.replicated, self.exp_avg,
                                                self.exp_avg_sq, pending):
            if work is not None:
                work.wait()
            lr = a.lr * float(lr_mult) * getattr(o.lr_mul, fam)
            decay = lr * a.weight_decay * getattr(o.wd_mul, fam)
            shard = self._shard(p, rep)
            _fast(shard)(shard, g, m, v, b1, b2, a.eps, torch.tensor(lr, dtype=torch.float32), step_size,
                         torch.tensor(decay, dtype=torch.float32))
            if self.world_size > 1 and not rep:
                gathers.append(all_gather_into(p.data, shard))
        for work in gathers:
            if work is not None:
                work.wait()

    def reset(self) -> None:
        """Zero the moments and the step counter."""
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m.zero_()
            v.zero_()
        self.t = 0

    def state_dict(self) -> dict:
        """Copies of this rank's state (safe to keep across later steps)."""
        return {"rank": self.rank, "world_size": self.world_size, "t": self.t,
                "exp_avg": [m.clone() for m in self.exp_avg], "exp_avg_sq": [v.clone() for v in self.exp_avg_sq]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("world_size") != self.world_size or sd.get("rank") != self.rank:
            raise ValueError(f"DistAdam state from rank {sd.get('rank')}/{sd.get('world_size')} cannot load "
                             f"into rank {self.rank}/{self.world_size}: the state is sharded per rank")
        if len(sd["exp_avg"]) != len(self.exp_avg):
            raise ValueError(f"DistAdam state has {len(sd['exp_avg'])} params, this optimizer {len(self.exp_avg)}")
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, sd["exp_avg"] + sd["exp_avg_sq"]):
            if dst.shape != src.shape:
                raise ValueError(f"DistAdam state shard {tuple(src.shape)} does not match {tuple(dst.shape)}")
            dst.copy_(src)
        self.t = int(sd["t"])


__all__ = ["DistAdam", "adam_update"]

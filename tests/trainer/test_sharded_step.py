"""Sharded NorMuon + DistAdam on 2 gloo ranks equal the same steps in one process.

    python -m pytest tests/trainer/test_sharded_step.py -q        (marker: dist; ~6 s on 2 cores)

Each rank gets its own gradients; the one-process reference gets their average. Every NorMuon
family has an odd count (3, or 1 for the smear gate), so each group is padded to 4 (or 2) slots
and rank 1 owns a padding slot (the smear gate's rank 1 owns nothing real). Two steps run, so
the momentum and second-moment buffers that live on the shards are exercised too; both weight
layouts are covered, and DistAdam's replicated path (a 1×4 gate moved to Adam: all-reduce, every
rank updates all of it). The same workers also check every fallback path of trainer/comm.py.

Tolerance: the 2-rank run performs the same arithmetic on the same values — gloo's average of
two tensors is (g0 + g1)/2 like the reference's — except that Polar Express runs on a different
batch split (a rank's chunk vs all matrices at once). A batched CPU matmul may round a matrix
differently with the batch size, and such a difference enters V in bf16, so the bound is one
bf16 ulp of the update: 2^-8·lr_eff·max|V| < 1e-3·(lr·4) here. Measured: bit-identical.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from trainer.adam import DistAdam
from trainer.presets import load_config
from trainer.normuon import NorMuon

pytestmark = pytest.mark.dist

WORLD = 2
D = 8
COUNTS = {"attn": 3, "mlp_up": 3, "mlp_down": 3, "attn_gate": 3, "smear_gate": 1}
STEPS = [(1.0, 0.85), (0.7, 0.9)]  # (lr_mult, momentum) per step
LAYOUTS = ("tall", "wide")


def build(layout: str):
    """Deterministic params: NorMuon (family, param) list and DistAdam (family, param) list."""
    g = torch.Generator().manual_seed(11)
    big = (4 * D, D) if layout == "tall" else (D, 4 * D)
    shapes = {"attn": big, "mlp_up": big, "mlp_down": big, "attn_gate": (2, 4), "smear_gate": (1, 4)}
    muon = []
    for fam, n in COUNTS.items():
        for _ in range(n):
            dtype = torch.bfloat16 if "gate" in fam else torch.float32
            muon.append((fam, torch.nn.Parameter((torch.randn(shapes[fam], generator=g) * 0.1).to(dtype))))
    adam = [("embed", torch.nn.Parameter(torch.randn(8, 6, generator=g).bfloat16())),
            ("value_embed", torch.nn.Parameter(torch.randn(8, 6, generator=g).bfloat16())),
            ("scalars", torch.nn.Parameter(torch.randn(6, generator=g))),
            ("head", torch.nn.Parameter(torch.randn(4, 6, generator=g) * 0.1)),
            # a gate moved to Adam (optim.optimizer): dim 0 of 1 does not split over 2 ranks → replicated
            ("smear_gate", torch.nn.Parameter((torch.randn(1, 4, generator=g) * 0.1).bfloat16()))]
    return muon, adam


def grads_for(params, rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for _, p in params]


def run_steps(layout: str, rank: int, world_size: int):
    cfg = load_config("tiny", overrides={"model.weight_layout": layout, "optim.muon.polar_backend": "torch",
                                         "optim.adam.weight_decay": 0.01})
    muon, adam = build(layout)
    opt_m = NorMuon(muon, cfg, rank, world_size)
    opt_a = DistAdam(adam, cfg, rank, world_size)
    for step, (lr_mult, mom) in enumerate(STEPS):
        for params in (muon, adam):
            if world_size == 1:  # the reference: the average of the two ranks' gradients
                per_rank = [grads_for(params, r, step) for r in range(WORLD)]
                gs = [(sum(x.float() for x in xs) / WORLD).to(xs[0].dtype) for xs in zip(*per_rank)]
            else:
                gs = grads_for(params, rank, step)
            for (_, p), gr in zip(params, gs):
                p.grad = gr
        muon[0][1].grad = None  # a missing gradient counts as zero on every rank
        opt_m.step(lr_mult, mom)
        opt_a.step(lr_mult)
    return [p.detach().clone() for _, p in muon + adam]


def check_comm_fallbacks(rank: int) -> None:
    """Every reduce-scatter path (AVG, SUM then divide, all-reduce then slice) and both gather
    paths give the same answer; `full` is left untouched. Raises in the worker on mismatch."""
    import torch.distributed as dist

    from trainer import comm

    backend = str(dist.get_backend())
    full = torch.arange(24, dtype=torch.float32).view(6, 4) * (rank + 1)  # rank r holds (r+1)·x
    expect = (torch.arange(24, dtype=torch.float32).view(6, 4) * 1.5)[rank * 3:(rank + 1) * 3]
    saved = dict(comm._MODE), dict(comm._GATHER_MODE)
    try:
        for mode in ("rs_avg", "rs_sum", "ar_sum"):
            comm._MODE[backend] = mode
            before = full.clone()
            out, work = comm.reduce_scatter_avg(full, WORLD)
            if work is not None:
                work.wait()
            torch.testing.assert_close(out, expect, rtol=0, atol=0, msg=lambda m: f"{mode}: {m}")
            assert torch.equal(full, before), f"{mode} modified its input"
        for gmode in ("into_tensor", "list"):
            comm._GATHER_MODE[backend] = gmode
            dst = torch.zeros(6, 4)
            chunk = torch.full((3, 4), float(rank))
            work = comm.all_gather_into(dst, chunk)
            if work is not None:
                work.wait()
            torch.testing.assert_close(dst, torch.tensor([0.0] * 3 + [1.0] * 3).view(6, 1).expand(6, 4))
            # In-place form used by DistAdam: the chunk is this rank's slice of the output.
            dst = torch.full((6, 4), -1.0)
            dst[rank * 3:(rank + 1) * 3] = float(rank)
            work = comm.all_gather_into(dst, dst[rank * 3:(rank + 1) * 3])
            if work is not None:
                work.wait()
            torch.testing.assert_close(dst, torch.tensor([0.0] * 3 + [1.0] * 3).view(6, 1).expand(6, 4))
    finally:
        comm._MODE.clear()
        comm._MODE.update(saved[0])
        comm._GATHER_MODE.clear()
        comm._GATHER_MODE.update(saved[1])
    assert comm.world() == (rank, WORLD)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {layout: run_steps(layout, rank, WORLD) for layout in LAYOUTS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        check_comm_fallbacks(rank)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    cfg = load_config("tiny")
    bound = 1e-3 * cfg.optim.muon.lr * 4  # one bf16 ulp of the largest NorMuon update, see docstring
    for layout in LAYOUTS:
        ref = run_steps(layout, 0, 1)
        start = [p.detach() for _, p in sum(build(layout), [])]
        for r in range(WORLD):
            for i, (got, want, p0) in enumerate(zip(ranks[r][layout], ref, start)):
                assert got.dtype == want.dtype and got.shape == want.shape
                err = (got.float() - want.float()).abs().max().item()
                assert err <= bound, f"{layout} rank {r} param {i}: max diff {err:.3g} > {bound:.3g}"
                assert not torch.equal(got, p0), f"{layout} param {i} did not move"
        # Both ranks hold identical parameters after the all-gathers.
        for a, b in zip(ranks[0][layout], ranks[1][layout]):
            assert torch.equal(a, b)

"""Collectives for the sharded optimizers, on NCCL (GPU), gloo (CPU) or no process group at all.

The optimizers call only these functions, so the same step runs under
`torchrun --nproc_per_node=8 -m trainer.train ...` (NCCL), two CPU ranks on gloo, and plain
`python -m trainer.train ...` (world size 1, no process group).

    from trainer.comm import world, reduce_scatter_avg, all_gather_into
    rank, ws = world()
    chunk, work = reduce_scatter_avg(stacked_grads, ws)   # launch ...
    ...                                                  # ... overlap other work ...
    if work is not None:
        work.wait()                                      # chunk is valid from here on

NCCL gets the fast path (one async `reduce_scatter` with ReduceOp.AVG). Backends that lack an
op fall back, once per backend and then from a cache: reduce-scatter SUM then divide after the
wait, and as a last resort all-reduce SUM then slice. Correctness first there; speed on NCCL.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_MODE: dict[str, str] = {}  # backend name → "rs_avg" | "rs_sum" | "ar_sum"  (first one that works)
_GATHER_MODE: dict[str, str] = {}  # backend name → "into_tensor" | "list"


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when none is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dist():
    import torch.distributed as dist

    return dist


def _reduce_scatter_fn():
    dist = _dist()
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_fn():
    dist = _dist()
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Finishing:
    """Wraps an async work handle; `wait()` waits for it, then runs a small finishing step."""

    def __init__(self, work: Any, finish) -> None:
        self._work = work
        self._finish = finish
        self._done = False

    def wait(self) -> bool:
        if not self._done:
            if self._work is not None:
                self._work.wait()
            self._finish()
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done


def _check_divisible(full: Tensor, world_size: int) -> int:
    if full.dim() == 0 or full.shape[0] % world_size:
        raise ValueError(f"reduce_scatter_avg: dim 0 of a tensor of shape {tuple(full.shape)} must be "
                         f"divisible by world_size={world_size}; pad it to a multiple first")
    return full.shape[0] // world_size


def reduce_scatter_avg(full: Tensor, world_size: int) -> tuple[Tensor, Any]:
    """Average `full` over ranks and return (this rank's dim-0 chunk, work handle or None).

    The chunk is valid only after `work.wait()` (when work is not None). With world_size 1 the
    chunk is `full` itself (no copy); otherwise `full` is only read.
    """
    if world_size == 1:
        return full, None
    chunk = _check_divisible(full, world_size)
    dist = _dist()
    rank = dist.get_rank()
    backend = str(dist.get_backend())
    full = full.contiguous()
    modes = [_MODE[backend]] if backend in _MODE else ["rs_avg", "rs_sum", "ar_sum"]
    last_err: Exception | None = None
    for mode in modes:
        try:
            if mode == "rs_avg":
                out = full.new_empty((chunk,) + tuple(full.shape[1:]))
                work = _reduce_scatter_fn()(out, full, op=dist.ReduceOp.AVG, async_op=True)
                _MODE[backend] = mode
                return out, work
            if mode == "rs_sum":
                out = full.new_empty((chunk,) + tuple(full.shape[1:]))
                work = _reduce_scatter_fn()(out, full, op=dist.ReduceOp.SUM, async_op=True)
                _MODE[backend] = mode
                return out, _Finishing(work, lambda: out.div_(world_size))
            buf = full.clone()  # all_reduce works in place; leave the caller's tensor alone
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)
            out = buf[rank * chunk:(rank + 1) * chunk]
            _MODE[backend] = mode
            return out, _Finishing(work, lambda: out.div_(world_size))
        except (RuntimeError, ValueError, NotImplementedError) as e:  # op unsupported on backend
            last_err = e
    raise RuntimeError(f"no reduce-scatter path works on backend {backend!r}: {last_err}")


def all_reduce_avg(full: Tensor, world_size: int) -> tuple[Tensor, Any]:
    """Average `full` over ranks into a new tensor: (result, work handle or None); for parameters
    whose dim 0 does not split over the ranks (a 1×12 gate on Adam). With world_size 1 the result
    is `full` itself. NCCL averages in the collective; other backends sum, then divide after wait."""
    if world_size == 1:
        return full, None
    dist = _dist()
    out = full.detach().clone().contiguous()
    if str(dist.get_backend()) == "nccl":
        return out, dist.all_reduce(out, op=dist.ReduceOp.AVG, async_op=True)
    work = dist.all_reduce(out, op=dist.ReduceOp.SUM, async_op=True)
    return out, _Finishing(work, lambda: out.div_(world_size))


def all_gather_into(out_full: Tensor, chunk: Tensor) -> Any:
    """Gather every rank's `chunk` into `out_full` (dim 0 = world_size·len(chunk)); async.

    Returns a work handle (or None when nothing is pending). `out_full` is valid after wait().
    """
    _, world_size = world()
    if world_size == 1:
        if out_full.data_ptr() != chunk.data_ptr():
            out_full.copy_(chunk)
        return None
    if out_full.shape[0] != world_size * chunk.shape[0] or out_full.shape[1:] != chunk.shape[1:]:
        raise ValueError(f"all_gather_into: out_full of shape {tuple(out_full.shape)} must be "
                         f"world_size={world_size} × chunk {tuple(chunk.shape)} along dim 0")
    dist = _dist()
    backend = str(dist.get_backend())
    chunk = chunk.contiguous()
    if backend != "nccl" and chunk.untyped_storage().data_ptr() == out_full.untyped_storage().data_ptr():
        chunk = chunk.clone()  # in-place gather (chunk is a slice of out_full): only NCCL allows it
    if _GATHER_MODE.get(backend, "into_tensor") == "into_tensor" and out_full.is_contiguous():
        try:
            work = _all_gather_fn()(out_full, chunk, async_op=True)
            _GATHER_MODE[backend] = "into_tensor"
            return work
        except (RuntimeError, ValueError, NotImplementedError):
            _GATHER_MODE[backend] = "list"
    parts = [torch.empty_like(chunk) for _ in range(world_size)]
    work = dist.all_gather(parts, chunk, async_op=True)
    n = chunk.shape[0]

    def finish() -> None:
        for r, part in enumerate(parts):
            out_full[r * n:(r + 1) * n].copy_(part)

    return _Finishing(work, finish)


__all__ = ["world", "reduce_scatter_avg", "all_reduce_avg", "all_gather_into"]

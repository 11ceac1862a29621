"""Each micro-batch's forward + backward replayed as a captured CUDA graph (runtime.cuda_graphs).

    steps = MicroSteps(device, params, enabled=True)
    steps.run(fwd_bwd, batch, key=(long, short, attn_scale))   # fwd_bwd(batch) accumulates into .grad
    steps.clear(params)                                          # after the optimizer: grads to zero

Why: with small micro-batches the step is bound by the host, not the GPU. Measured on an H200
(docs/performance.md): the `speedrun` preset's 131,072-token stage kept the GPU busy 65 % of the
step; per micro-batch the host issued ~460 kernel launches, 140 matmuls and 20 FlashAttention-4
calls (~0.25 ms of Python each). A replayed graph launches the same kernels in the same order from
one host call, so numerics do not change.

How: the first micro-batch of each key (window, YaRN scale, shapes) runs for real on a side stream
(it also warms the graph up: allocator, cuBLAS workspaces), then the same call is recorded — not
run — into a graph that reads static copies of the batch tensors; later micro-batches of that key
copy their tensors into the static ones and replay. Gradients must stay the same tensors for
the graphs to accumulate into them, so they are zeroed in place (`clear`) instead of being set
to None, and created as zeros before the first capture. Graphs share one memory pool (they never
run concurrently and keep no output that is read later). A capture that fails (an operation the
GPU cannot record) is said once on stderr and the run goes on without graphs; the micro-batch
that failed had already run on the side stream.

A long-lived worker (trainer.serve) keeps its MicroSteps with the model for the next run, which then
replays the graphs the earlier runs captured instead of capturing its own (`rebind`). That is sound
only while everything a graph reads or writes outside its static batch is the same memory: the
parameters (the kept model's, refreshed in place), their .grad tensors (checked by identity; zeroed,
not dropped, between runs), the rotary tables and window tensors (the run's `context`: a change drops
every graph) and the loss scale (part of `context` too). One side stream serves every capture: each
new stream would get a cuBLAS workspace of its own that is never freed (measured: +254 MiB of peak
memory per served run on an H200 before this).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class MicroSteps:
    """Runs `fwd_bwd(batch)` per micro-batch, eagerly or from captured graphs (module docstring)."""

    def __init__(self, device: torch.device, params: list[torch.nn.Parameter], enabled: bool) -> None:
        self.device, self.params = device, params
        self.enabled = bool(enabled and device.type == "cuda")
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.side = torch.cuda.Stream(device) if self.enabled else None  # where first micro-batches run
        self.captures = 0
        self.context: tuple = ()  # what every graph bakes in besides its key: set by rebind
        self._grads: list[Tensor] | None = None  # the .grad tensors the graphs accumulate into

    def rebind(self, params: list[torch.nn.Parameter], context: tuple) -> bool:
        """Start a run (the first, or a later one on a kept model): keep the captured graphs only if
        they accumulate into exactly these parameters' .grad tensors and `context` (tensors' addresses
        and constants the graphs read: the rotary tables, the loss scale) is unchanged; zero those
        grads. Otherwise drop every graph; they are captured again as the run meets their keys.
        Any .grad left from an earlier run is zeroed either way. Returns False where graphs were dropped."""
        same = (self._grads is not None and context == self.context and len(params) == len(self._grads)
                and all(p.grad is g for p, g in zip(params, self._grads)))
        dropped = bool(self.graphs) and not same
        if not same:
            self.graphs.clear()
            self._grads = None
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
        self.params, self.context = params, context
        return not dropped

    @staticmethod
    def _shapes(batch: tuple) -> tuple:
        return tuple((tuple(t.shape), t.dtype) if isinstance(t, Tensor) else t for t in batch)

    def run(self, fwd_bwd: Callable[[Any], None], batch: tuple, key: tuple) -> None:
        if not self.enabled:
            fwd_bwd(batch)
            return
        full = key + self._shapes(batch)
        hit = self.graphs.get(full)
        if hit is not None:
            graph, static = hit
            for dst, src in zip(static, batch):
                if isinstance(dst, Tensor):
                    dst.copy_(src, non_blocking=True)
            graph.replay()
            return
        self._capture(fwd_bwd, batch, full)

    def _capture(self, fwd_bwd: Callable[[Any], None], batch: tuple, full: tuple) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        static = type(batch)(*(t.clone() if isinstance(t, Tensor) else t for t in batch))
        main = torch.cuda.current_stream(self.device)
        side = self.side
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fwd_bwd(static)  # this micro-batch, for real; also the graph's warm-up
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                fwd_bwd(static)  # recorded, not run
        except Exception as e:  # noqa: BLE001 - any capture failure: go on without graphs
            self.enabled = False
            self.graphs.clear()
            self._grads = None
            print(f"[trainer.graphs] capturing the micro-batch as a CUDA graph failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); continuing without graphs "
                  "(runtime.cuda_graphs=false avoids the attempt)", file=sys.stderr, flush=True)
            return
        self.graphs[full] = (graph, static)
        self.captures += 1
        if self._grads is None:
            self._grads = [p.grad for p in self.params]

    def clear(self, params: list[torch.nn.Parameter]) -> None:
        """Drop the accumulated gradients of `params`: zeroed in place while graphs hold them,
        else set to None (PyTorch's default)."""
        if self.enabled:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
            return
        for p in params:
            p.grad = None


__all__ = ["MicroSteps"]

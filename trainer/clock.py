"""Per-step times of the timed loop, read without making the host wait for the device.

    clock = StepClock(device, every=cfg.runtime.log_every)
    clock.restart(train_ms, step)            # right after a device sync (the timer's t0)
    run.train_step(...); clock.mark(step + 1)
    for step, train_time_ms, step_ms in clock.ready():   # the marks the device has passed
        ...
    clock.ready(wait=True)                   # after the next sync: everything left

The record times training only between device synchronizations at validation; per-step figures in
its log come from the host clock. Here a mark on CUDA is a timing event recorded on the stream
after the step's work; `ready()` returns the marks whose events have completed (a non-blocking
query), so emitting step events never adds a synchronization and `runtime.log_every` does not
change the measured time. On the CPU, work is synchronous and marks are host clock readings.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch


class StepClock:
    def __init__(self, device: torch.device, every: int = 1) -> None:
        self.cuda = device.type == "cuda"
        self.every = max(1, int(every))
        self.pending: deque[tuple[int, Any]] = deque()
        self.base_ms = 0.0
        self.start: Any = None
        self.prev: tuple[Any, int] | None = None

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else 1000.0 * (b - a)

    def restart(self, train_ms: float, step: int) -> None:
        """Start a timed stretch at training time train_ms, after `step` steps (call after a sync)."""
        self.pending.clear()
        self.base_ms = train_ms
        self.start = self._now()
        self.prev = (self.start, step)

    def mark(self, step: int) -> None:
        """`step` steps are queued; keep a mark if step events are due (every `every` steps)."""
        if step % self.every == 0:
            self.pending.append((step, self._now()))

    def ready(self, wait: bool = False) -> list[tuple[int, float, float]]:
        """(step, train_time_ms, mean step_ms since the previous mark) for each mark the device
        has passed, oldest first; wait=True takes them all (use it only after a sync)."""
        out = []
        while self.pending:
            step, m = self.pending[0]
            if self.cuda and not wait and not m.query():
                break
            self.pending.popleft()
            prev_mark, prev_step = self.prev
            out.append((step, self.base_ms + self._ms(self.start, m), self._ms(prev_mark, m) / (step - prev_step)))
            self.prev = (m, step)
        return out


__all__ = ["StepClock"]

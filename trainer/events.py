"""The trainer's stdout protocol: one JSON object per line, rank 0 only, nothing else on stdout.

    from trainer.events import Emitter
    ev = Emitter(enabled=rank == 0)
    ev.emit("val", step=0, val_loss=10.8, train_time_ms=0.0)

Every object has "event" and "t" (unix time). Non-finite floats (a diverged loss) become null,
so every line is strict JSON. Event kinds and fields: docs/trainer.md.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, TextIO

EVENTS = ("start", "warmup", "val", "step", "end", "error", "served")  # served: trainer.serve


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class Emitter:
    """Writes events to `stream` (default sys.stdout at emit time) when enabled."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Build the event dict, print it as one line when enabled, and return it."""
        if event not in EVENTS:
            raise ValueError(f"event={event!r} is not one of {', '.join(EVENTS)}")
        obj = _clean({"event": event, "t": time.time(), **fields})
        if self.enabled:
            out = self.stream or sys.stdout
            out.write(json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n")
            out.flush()
        return obj


__all__ = ["Emitter", "EVENTS"]

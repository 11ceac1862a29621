"""What a trial tells Ray Tune while its run goes: the run's node first, then its progress.

    from ablate.run.reporting import report_node, event_reporter
    payload = report_node()                          # {"node_id", "node_ip", "hostname"}, also reported
    on_event = event_reporter(every_s=2.0)           # for run_process / a worker: val now, steps throttled

Shared by the trainer's trials (ablate.run.trial) and script arms (ablate.run.script_trial).
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any


def report_node() -> dict[str, Any]:
    """Report where the attempt runs (so even an attempt lost with its node records that node) and
    return it as the start of the attempt's payload."""
    import ray
    from ray import tune

    payload: dict[str, Any] = {"node_id": None, "node_ip": None, "hostname": socket.gethostname()}
    try:
        payload["node_id"] = ray.get_runtime_context().get_node_id()
        payload["node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 (provenance only)
        pass
    tune.report({"ablate_node": json.dumps(payload)})
    return payload


def event_reporter(every_s: float) -> Callable[[dict], None]:
    """An on_event callback: each `val` event reported to Tune at once, `step` events at most once
    per `every_s` seconds (the progress display needs no more)."""
    from ray import tune

    last = [0.0]

    def on_event(ev: dict) -> None:
        kind = ev.get("event")
        if kind == "val":
            tune.report({k: ev.get(k) for k in ("step", "val_loss", "train_time_ms")})
        elif kind == "step" and time.time() - last[0] >= every_s:
            last[0] = time.time()
            tune.report({k: ev.get(k) for k in ("step", "train_time_ms", "step_ms")})

    return on_event


__all__ = ["report_node", "event_reporter"]

"""ablate.run.reporting: what a trial reports to Tune (val at once, steps throttled, node first)."""
import json

from ray import tune

from ablate.run import reporting


def test_val_events_always_go_and_step_events_are_throttled(monkeypatch):
    sent = []
    monkeypatch.setattr(tune, "report", lambda d: sent.append(d))
    clock = [100.0]
    monkeypatch.setattr(reporting.time, "time", lambda: clock[0])
    on_event = reporting.event_reporter(every_s=2.0)
    on_event({"event": "step", "step": 1, "train_time_ms": 10.0, "step_ms": 10.0})
    on_event({"event": "step", "step": 2, "train_time_ms": 20.0, "step_ms": 10.0})  # 0 s later: dropped
    on_event({"event": "val", "step": 2, "val_loss": 3.5, "train_time_ms": 20.0})   # val: never dropped
    clock[0] += 2.0
    on_event({"event": "step", "step": 3, "train_time_ms": 30.0, "step_ms": 10.0})
    on_event({"event": "start"})  # other events are not progress
    assert [d.get("step") for d in sent] == [1, 2, 3]
    assert sent[1] == {"step": 2, "val_loss": 3.5, "train_time_ms": 20.0}


def test_report_node_reports_and_returns_where_the_run_is(monkeypatch):
    import ray

    sent = []
    monkeypatch.setattr(tune, "report", lambda d: sent.append(d))
    # a worker's runtime context, faked: the real one outside a worker would start Ray in this process
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"get_node_id": lambda self: "n1"})())
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    payload = reporting.report_node()
    assert payload["node_id"] == "n1" and payload["node_ip"] == "10.0.0.7" and payload["hostname"]
    assert json.loads(sent[0]["ablate_node"]) == payload
    assert not ray.is_initialized()


def test_report_node_keeps_the_hostname_when_ray_cannot_say(monkeypatch):
    import ray

    def no_context():
        raise RuntimeError("not in a worker")

    monkeypatch.setattr(tune, "report", lambda d: None)
    monkeypatch.setattr(ray, "get_runtime_context", no_context)
    payload = reporting.report_node()
    assert payload["node_id"] is None and payload["node_ip"] is None and payload["hostname"]

"""Retries: a failed attempt goes back to the head of the queue the moment it fails (not after
the other runs), with its own row; input errors, divergence, the budget and a stop end a run.

    python -m pytest tests/ablate/test_retry.py -q

Drives ablate.run.driver's queue (`AttemptQueue`, what Tune asks for trials) and callback (`TuneRuns`)
the way Tune 2.60 calls them, without Ray: a trial's end reaches the search algorithm first, then
the callback, and only then does Tune ask for the next trial. tests/ablate/test_e2e.py
(test_failed_attempt_is_relaunched_while_the_other_runs_go_on) checks the same through real Tune.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from ray.tune.search import Searcher

from ablate.errors import StoreError
from ablate.spec.matrix import expand, plan
from ablate.run.driver import AttemptQueue, TuneRuns
from ablate.run.progress import NullProgress
from ablate.spec.model import parse_spec_text

SPEC = """\
name: retry
trainer: {preset: tiny}
arms:
  flaky: {}
  bad-data: {optim.muon.lr: 0.03}
  nan: {optim.muon.lr: 0.04}
  fine: {optim.muon.lr: 0.05}
seeds: 1
retries: 2
baseline: fine
resources: {gpus_per_run: 0, cpu_ranks_per_run: 1}
"""
OK = {"ok": True, "end": {"final_val_loss": 3.5}, "curve": [{"step": 4, "val_loss": 3.5}]}
CRASH = {"ok": False, "error": "RuntimeError: boom", "error_type": "RuntimeError"}
BAD_INPUT = {"ok": False, "error": "DataError: no training shards", "error_type": "DataError"}
NAN = {"ok": True, "end": {"final_val_loss": None}, "curve": [{"step": 2, "val_loss": None}]}


class Lines(NullProgress):
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, int]] = []

    def finished(self, run_id, status, final_val_loss=None, wall_s=None, retries_left=0, error=None) -> None:
        self.lines.append((run_id, status, retries_left))


class Tune:
    """What Tune does with the two objects, one call at a time."""

    def __init__(self, runs: TuneRuns) -> None:
        self.runs, self.queue, self.n = runs, AttemptQueue(runs), 0
        self.trials: dict[str, SimpleNamespace] = {}

    def start(self) -> str | None:
        """Ask for the next trial and start it: its run_id, None (wait) or FINISHED."""
        self.n += 1
        tid = f"t{self.n}"
        cfg = self.queue.suggest(tid)
        if cfg in (None, Searcher.FINISHED):
            return cfg
        trial = self.trials[cfg["run_id"]] = SimpleNamespace(trial_id=tid, config=cfg, last_result={})
        self.runs.on_trial_start(0, [], trial)
        self.runs.on_trial_result(0, [], trial, {"ablate_node": json.dumps({"node_id": f"node-{tid}"})})
        return cfg["run_id"]

    def end(self, run_id: str, payload: dict) -> None:
        trial = self.trials[run_id]
        self.queue.on_trial_complete(trial.trial_id, result={})
        trial.last_result = {"ablate_payload": json.dumps(payload)}
        self.runs.on_trial_complete(0, [], trial)

    def lose(self, run_id: str) -> None:
        """The trial's node died: Tune reports an error (search algorithm first, then callbacks)."""
        trial = self.trials[run_id]
        trial.error_file, trial.get_error = None, lambda: "The actor died because its node has died."
        self.queue.on_trial_complete(trial.trial_id, error=True)
        self.runs.on_trial_error(0, [], trial)


def _runs(store, first_order: int = 0) -> tuple[TuneRuns, Lines, dict[str, str]]:
    spec = parse_spec_text(SPEC)
    todo = plan(expand(spec), store.runs(spec.name), spec.retries)
    ids = {p.request.arm: p.request.run_id(1)[:-3] for p in todo}  # arm → run id without "-a<n>"
    progress = Lines()
    return TuneRuns(spec, todo, [{"arm": p.request.arm} for p in todo], store, progress, first_order=first_order), \
        progress, ids


def test_failed_attempt_goes_first_and_every_attempt_is_a_row(store) -> None:
    """Two slots. flaky fails twice and is relaunched each time before the runs still queued;
    bad-data fails on input (not retried), nan diverges (not retried), flaky's third failure
    spends its budget (1 + retries attempts)."""
    runs, progress, ids = _runs(store, first_order=10)
    tune = Tune(runs)
    flaky, bad, nan, fine = (ids[a] for a in ("flaky", "bad-data", "nan", "fine"))
    assert [tune.start(), tune.start()] == [f"{flaky}-a1", f"{bad}-a1"]
    tune.end(f"{flaky}-a1", CRASH)
    assert tune.start() == f"{flaky}-a2"  # the retry first, while bad-data still runs; nan waits
    tune.end(f"{bad}-a1", BAD_INPUT)
    assert tune.start() == f"{nan}-a1"  # bad input: no second attempt
    tune.lose(f"{flaky}-a2")  # lost with its node: a failed attempt like any other
    assert tune.start() == f"{flaky}-a3"
    tune.end(f"{nan}-a1", NAN)
    assert tune.start() == f"{fine}-a1"  # diverged: an outcome, not retried
    tune.end(f"{flaky}-a3", CRASH)  # 3 = 1 + retries attempts: no fourth
    assert tune.start() is None  # fine is in flight: wait (it could still fail and come back)
    tune.end(f"{fine}-a1", OK)
    assert tune.start() == Searcher.FINISHED

    assert progress.lines == [(f"{flaky}-a1", "failed", 2), (f"{bad}-a1", "failed", 0),
                              (f"{flaky}-a2", "failed", 1), (f"{nan}-a1", "diverged", 0),
                              (f"{flaky}-a3", "failed", 0), (f"{fine}-a1", "ok", 0)]
    rows = store.runs("retry")
    assert list(zip(rows["run_id"], rows["attempt"], rows["order"], rows["status"])) == [
        (f"{flaky}-a1", 1, 10, "failed"), (f"{bad}-a1", 1, 11, "failed"), (f"{flaky}-a2", 2, 12, "failed"),
        (f"{nan}-a1", 1, 13, "diverged"), (f"{flaky}-a3", 3, 14, "failed"), (f"{fine}-a1", 1, 15, "ok")]
    lost = rows[rows["run_id"] == f"{flaky}-a2"].iloc[0]
    assert lost["error"].startswith("Ray trial failed: The actor died because its node has died")
    assert lost["node_id"] == "node-t3"  # the node the trial reported when it started
    assert rows[rows["run_id"] == f"{bad}-a1"]["error"].iloc[0].startswith("input error (not retried): DataError")
    # results in the order of the planned runs: the last attempt of each, and how many started
    assert [(r.request.arm, r.status, r.run_id, r.attempts, r.input_error) for r in runs.results()] == [
        ("flaky", "failed", f"{flaky}-a3", 3, False), ("bad-data", "failed", f"{bad}-a1", 1, True),
        ("nan", "diverged", f"{nan}-a1", 1, False), ("fine", "ok", f"{fine}-a1", 1, False)]
    assert runs.cancel_unfinished("not used") is False  # every run has an outcome


def test_no_retry_after_a_failed_store_write_and_nothing_else_starts(store, monkeypatch) -> None:
    """The first failed store write stops the experiment: the failed attempt is not queued again,
    the queue hands out nothing more, and the runs without an outcome are reported missing."""
    runs, _, ids = _runs(store)
    tune = Tune(runs)
    assert tune.start() == f"{ids['flaky']}-a1"

    def disk_full(*a, **k):
        raise StoreError("cannot write runs/x.parquet: [Errno 28] No space left on device")

    monkeypatch.setattr(store, "write_run", disk_full)
    tune.end(f"{ids['flaky']}-a1", CRASH)
    assert runs.stop_reason() and "No space left" in runs.store_error
    assert list(runs.queue) == [(i, p) for i, p in enumerate(runs.todo)][1:]  # no flaky-a2 at the head
    assert tune.start() == Searcher.FINISHED
    assert runs.cancel_unfinished("the experiment stopped") is True


def test_interrupted_retry_is_cancelled_and_resume_continues_the_count(store) -> None:
    """Ctrl-C while a retry runs: it gets a `cancelled` row (not counted against the budget);
    the next invocation plans the attempt after it."""
    runs, _, ids = _runs(store)
    tune = Tune(runs)
    flaky = ids["flaky"]
    assert tune.start() == f"{flaky}-a1"
    tune.end(f"{flaky}-a1", CRASH)
    assert tune.start() == f"{flaky}-a2"
    assert runs.cancel_unfinished("the driver was interrupted") is True
    rows = store.runs("retry")
    assert list(zip(rows["run_id"], rows["status"])) == [(f"{flaky}-a1", "failed"), (f"{flaky}-a2", "cancelled")]
    again, _, _ = _runs(store, first_order=2)
    first = again.todo[0]
    assert (first.request.arm, first.attempt, first.attempts_left) == ("flaky", 3, 2)


@pytest.mark.parametrize("retries", [0, 1])
def test_retries_bound_the_attempts(store, retries: int) -> None:
    spec = parse_spec_text(SPEC.replace("retries: 2", f"retries: {retries}"))
    todo = plan(expand(spec, arms=["flaky"]), store.runs(spec.name), spec.retries)
    tune = Tune(TuneRuns(spec, todo, [{}], store, NullProgress()))
    started = []
    while (rid := tune.start()) not in (None, Searcher.FINISHED):
        started.append(rid)
        tune.end(rid, CRASH)
    assert [r[-2:] for r in started] == [f"a{i}" for i in range(1, retries + 2)]
    assert rid == Searcher.FINISHED

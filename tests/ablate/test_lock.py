"""One driver per experiment (ablate.store.lock), `ablate rm`, and the start-of-run clean-up. No Ray.

    python -m pytest tests/ablate/test_lock.py -q
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli.main import app
from ablate.errors import LockHeld, LockLost
from ablate.store.lock import LOCK_FILE, LockInfo, acquire, experiment_lock, held_by
from ablate.store.parquet import Store
from tests.ablate.test_store import CURVE, STEPS, make_run

SPEC = """\
name: exp
trainer: {preset: tiny}
arms: {baseline: {}, lr: {optim.muon.lr: 0.05}}
seeds: 2
resources: {gpus_per_run: 0}
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _foreign_lock(store: Store, experiment: str, *, age_s: float = 0.0, pid: int | None = None,
                  same_machine: bool = False) -> LockInfo:
    """A lock as another driver would have written it."""
    info = LockInfo.mine("ablate run other.yaml")
    info.token = "other-driver"
    if not same_machine:
        info.host, info.pid_space, info.pid, info.pid_start = "gpu-head-7", "another-boot:123", 4242, None
    elif pid is not None:
        info.pid, info.pid_start = pid, None
    info.heartbeat_at -= age_s
    store.write_bytes(experiment, LOCK_FILE, info.dump())
    return info


def test_second_driver_is_refused_with_the_holder_named(store: Store) -> None:
    with experiment_lock(store, "exp", command="ablate run a.yaml") as lock:
        assert json.loads(store.read_bytes("exp", LOCK_FILE))["token"] == lock.info.token
        with pytest.raises(LockHeld) as info:
            acquire(store, "exp", command="ablate run b.yaml")
        msg = str(info.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in msg
        assert "command: ablate run a.yaml" in msg and "--take-over" in msg and "lock.json" in msg
        assert info.value.exit_code == 2
        assert held_by(store, "exp").token == lock.info.token
    assert store.read_bytes("exp", LOCK_FILE) is None  # released
    assert held_by(store, "exp") is None


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_only_one_of_many_simultaneous_drivers_wins(store: Store, stale: bool) -> None:
    if stale:  # all of them take over the same dead driver's lock at once
        _foreign_lock(store, "exp", same_machine=True, pid=_dead_pid())
    wins, refused = [], []
    go = threading.Barrier(8)

    def one() -> None:
        go.wait()
        try:
            wins.append(acquire(store, "exp", heartbeat_s=60))
        except LockHeld:
            refused.append(1)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(refused) == 7
    assert json.loads(store.read_bytes("exp", LOCK_FILE))["token"] == wins[0].info.token
    wins[0].release()


def test_stale_locks_are_taken_over(store: Store) -> None:
    # a driver on this machine whose process is gone
    _foreign_lock(store, "exp", same_machine=True, pid=_dead_pid())
    with experiment_lock(store, "exp") as lock:
        assert "is no longer running" in lock.took_over
    # a driver elsewhere whose heartbeat stopped long ago
    _foreign_lock(store, "exp", age_s=3600)
    with experiment_lock(store, "exp") as lock:
        assert "heartbeat is 3600 s old" in lock.took_over and "gpu-head-7" in lock.took_over
    # a driver elsewhere with a recent heartbeat: refused, unless --take-over
    _foreign_lock(store, "exp", age_s=5)
    with pytest.raises(LockHeld, match="host gpu-head-7, pid 4242"):
        acquire(store, "exp")
    with experiment_lock(store, "exp", take_over=True) as lock:
        assert "--take-over" in lock.took_over


def test_heartbeat_notices_a_take_over_and_never_deletes_the_new_lock(store: Store) -> None:
    lock = acquire(store, "exp", heartbeat_s=3600)
    lock.heartbeat()
    assert not lock.lost.is_set()
    other = _foreign_lock(store, "exp")  # someone ran with --take-over
    lock.heartbeat()
    assert lock.lost.is_set() and "taken over by host gpu-head-7, pid 4242" in lock.reason
    with pytest.raises(LockLost):
        lock.check()
    lock.release()
    assert json.loads(store.read_bytes("exp", LOCK_FILE))["token"] == other.token


def test_lock_on_an_object_store() -> None:
    """fsspec memory:// has no create-if-absent: PUT, settle, read back."""
    store = Store(f"memory://ablate-lock-{os.getpid()}-{time.time_ns()}")
    with experiment_lock(store, "exp", settle_s=0.01) as lock:
        with pytest.raises(LockHeld):
            acquire(store, "exp", settle_s=0.01)
        lock.heartbeat()
        assert not lock.lost.is_set()
    assert store.read_bytes("exp", LOCK_FILE) is None


def test_run_refuses_a_locked_experiment_before_anything_starts(tmp_path: Path, store: Store) -> None:
    spec = tmp_path / "exp.yaml"
    spec.write_text(SPEC)
    _foreign_lock(store, "exp", age_s=2)
    res = CliRunner().invoke(app, ["run", str(spec), "--store", store.uri])
    assert res.exit_code == 2, res.output
    assert "locked by another driver (host gpu-head-7, pid 4242" in res.output and "--take-over" in res.output
    assert store.read_bytes("exp", "spec.yaml") is None  # nothing written
    status = CliRunner().invoke(app, ["status", "exp", "--store", store.uri], env={"COLUMNS": "200"})
    assert "driver: host gpu-head-7, pid 4242" in status.output


def _store_with_runs(store: Store) -> None:
    store.write_bytes("exp", "spec.yaml", SPEC.encode())
    for i, (arm, seed, status) in enumerate([("baseline", 0, "ok"), ("lr", 0, "ok"), ("lr", 1, "failed")]):
        store.write_run(make_run(arm, seed, status=status, order=i, experiment="exp"), CURVE, STEPS)


def test_rm_an_arm_and_a_run(store: Store) -> None:
    _store_with_runs(store)
    res = CliRunner().invoke(app, ["rm", "exp", "--arm", "lr", "--store", store.uri])  # not a terminal, no --yes
    assert res.exit_code == 2 and "add --yes" in res.output and "2 run attempt(s)" in res.output
    assert len(store.runs("exp")) == 3
    res = CliRunner().invoke(app, ["rm", "exp", "--arm", "lr", "--yes", "--store", store.uri])
    assert res.exit_code == 0, res.output
    assert store.runs("exp")["arm"].tolist() == ["baseline"]
    assert set(store.curves("exp")["arm"]) == {"baseline"} and set(store.steps("exp")["arm"]) == {"baseline"}
    assert not list((Path(store.root) / "exp" / "curves").glob("lr-*"))  # the files, not only the rows
    res = CliRunner().invoke(app, ["rm", "exp", "--run", "nope-s0-abc-a1", "--yes", "--store", store.uri])
    assert res.exit_code == 2 and "not in experiment 'exp'" in res.output
    res = CliRunner().invoke(app, ["rm", "exp", "--run", "baseline-s0-abcdefabcdef-a1", "--yes", "--store", store.uri])
    assert res.exit_code == 0 and len(store.runs("exp")) == 0


def test_rm_refuses_while_a_driver_holds_the_lock_and_removes_a_whole_experiment(store: Store) -> None:
    _store_with_runs(store)
    with experiment_lock(store, "exp"):
        res = CliRunner().invoke(app, ["rm", "exp", "--yes", "--store", store.uri])
        assert res.exit_code == 2 and "locked by another driver" in res.output
        assert len(store.runs("exp")) == 3
    res = CliRunner().invoke(app, ["rm", "exp", "--yes", "--store", store.uri])
    assert res.exit_code == 0, res.output
    assert "whole experiment 'exp' (3 run attempts" in res.output
    assert not (Path(store.root) / "exp").exists() and store.experiments() == []
    res = CliRunner().invoke(app, ["rm", "../outside", "--yes", "--store", store.uri])
    assert res.exit_code == 2 and "not a valid experiment name" in res.output


def test_start_cleans_what_a_killed_driver_left(tmp_path: Path, store: Store) -> None:
    from ablate.run.driver import TUNE_DIR_PREFIX, clean_stale_tune_dirs, prepare_experiment
    from ablate.spec.model import parse_spec_text

    spec = parse_spec_text(SPEC)
    store.mark_inflight("exp", "lr-s1-x-a1", {"run_id": "lr-s1-x-a1", "arm": "lr", "seed": 1})
    runs_dir = Path(store.root) / "exp" / "runs"
    runs_dir.mkdir(parents=True)
    (runs_dir / ".lr-s1-x-a1.parquet.1234abcd.tmp").write_bytes(b"PAR1 half a file")
    tmp = tmp_path / "tmp"
    dead = tmp / f"{TUNE_DIR_PREFIX}{_dead_pid()}-abc"
    live = tmp / f"{TUNE_DIR_PREFIX}{os.getpid()}-def"
    for d in (dead, live):
        (d / "exp").mkdir(parents=True)
    assert clean_stale_tune_dirs(str(tmp)) == [str(dead)]
    assert live.exists() and not dead.exists()

    notes = []

    class Notes:
        def note(self, text: str) -> None:
            notes.append(text)

    prepare_experiment(spec, store, Notes())
    assert store.inflight("exp") == [] and not list(runs_dir.iterdir())
    assert "1 in-flight marker(s) (lr-s1-x-a1; these runs start again), 1 temporary file(s)" in notes[0]

"""ablate.run.workers: a long-lived torchrun gang (trainer.serve) runs run after run (no Ray).

    python -m pytest tests/ablate/test_workers.py -q        # ~30 s on 2 cores

Real torchrun, 2 gloo ranks, the tiny preset shortened as in experiments/smoke.yaml.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from ablate.run.launch import run_process, torchrun_command
from ablate.run.workers import Worker, worker_for, CURRENT
from tests.ablate.test_launch import _alive, _wait_gone

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())["trainer"]["set"]


def _cfg(tmp_path: Path, name: str, **extra) -> str:
    over = {**SMOKE, "data.data_dir": str(tmp_path.parent / "data"), **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(over))
    return str(path)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _curve(res):
    return [(e["step"], e["val_loss"]) for e in res.curve]


def test_worker_runs_match_fresh_processes_and_skip_the_launch(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "c")
    fresh = [run_process(torchrun_command(2, "tiny", cfg, seed), env=_env(), cwd=str(ROOT)) for seed in (0, 1)]
    assert all(r.ok for r in fresh), fresh[0].error_text()
    w = Worker(2, cwd=str(ROOT), env=_env())
    try:
        served = [w.run("tiny", cfg, seed, timeout_s=120) for seed in (0, 1, 0)]
        assert all(r.ok and r.returncode == 0 for r in served), served[0].error_text()
        assert [_curve(r) for r in served] == [_curve(fresh[0]), _curve(fresh[1]), _curve(fresh[0])]
        assert w.served == 3 and w.alive
        # the first run's clock starts with the worker (its launch counts); later runs start at hand-over
        assert served[0].started_at == w.started_at
        assert served[1].start_event_at - served[1].started_at < 0.5 * (fresh[1].start_event_at - fresh[1].started_at)
        assert [e["event"] for e in served[1].events][-1] == "served"
        pids = [p for p in _tree(w)]
    finally:
        w.close()
    assert not w.alive and _wait_gone(pids) == [] and not os.path.exists(w.jobs_dir)


def _tree(w: Worker) -> list[int]:
    from ablate.run.launch import descendants

    return [w._g.proc.pid, *descendants(w._g.proc.pid)]


def test_failed_run_ends_the_worker_and_the_next_one_starts_fresh(tmp_path: Path) -> None:
    ok_cfg = _cfg(tmp_path, "ok")
    bad_cfg = _cfg(tmp_path, "bad", **{"debug.fail_at_step": 3})
    key = ("test", 2)
    CURRENT.clear()
    w1 = worker_for(key, 2, cwd=str(ROOT), env=_env())
    bad = w1.run("tiny", bad_cfg, 0, timeout_s=120)
    assert not bad.ok and bad.returncode not in (0, None)
    assert "debug.fail_at_step=3" in (bad.error_text() or "")
    assert not w1.alive
    w2 = worker_for(key, 2, cwd=str(ROOT), env=_env())  # the dead one is replaced
    assert w2 is not w1
    good = w2.run("tiny", ok_cfg, 0, timeout_s=120)
    assert good.ok, good.error_text()
    assert worker_for(key, 2, cwd=str(ROOT), env=_env()) is w2  # same key, alive: kept
    w3 = worker_for(("other",), 2, cwd=str(ROOT), env=_env())  # another key closes the old one
    assert w3 is not w2 and not w2.alive
    w3.close()
    CURRENT.clear()


def test_timeout_kills_the_worker(tmp_path: Path) -> None:
    slow = _cfg(tmp_path, "slow", **{"schedule.num_scheduled_iterations": 100000})
    w = Worker(2, cwd=str(ROOT), env=_env())
    t0 = time.time()
    res = w.run("tiny", slow, 0, timeout_s=15)
    assert res.stopped and "timeout after 15 s" in res.stopped and not res.ok
    assert time.time() - t0 < 60 and not w.alive
    with pytest.raises(RuntimeError, match="has ended"):
        w.run("tiny", slow, 0)
    w.close()

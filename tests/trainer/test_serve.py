"""trainer.serve: runs after the first in the same process give the same results as fresh ones.

    python -m pytest tests/trainer/test_serve.py -q
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer import train
from trainer.config import flatten, to_dict
from trainer.serve import _alive, serve
from tests.trainer.test_train import _fast

REPO = Path(__file__).resolve().parents[2]


def _job_file(tmp_path, name, cfg):
    """The whole resolved config as a --config file (what ablate writes is only the overrides)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(flatten(to_dict(cfg))))
    return str(path)


def test_reused_model_gives_the_fresh_runs_results(tiny_data, capsys):
    """main(reuse=True) twice keeps one model object and still reproduces fresh runs exactly,
    also after a run of another seed and of another optimizer setting in between."""
    fresh = {}
    for seed, lr in ((0, None), (1, None), (0, 0.05)):
        extra = {} if lr is None else {"optim.muon.lr": lr}
        train._KEPT.clear()
        fresh[(seed, lr)] = train.main(_fast(tiny_data, seed=seed, **extra))["final_val_loss"]
    train._KEPT.clear()
    kept_ids = []
    for seed, lr in ((0, None), (1, None), (0, 0.05), (0, None)):
        extra = {} if lr is None else {"optim.muon.lr": lr}
        end = train.main(_fast(tiny_data, seed=seed, **extra), reuse=True)
        assert end["final_val_loss"] == fresh[(seed, lr)], (seed, lr)
        kept_ids.append(id(next(iter(train._KEPT.values())).model))
    assert len(set(kept_ids)) == 1  # the same model object served every run
    kept = next(iter(train._KEPT.values()))
    assert kept.steps is not None and not kept.steps.enabled  # CPU: no graphs, but the holder is kept
    train._KEPT.clear()
    # another model config replaces the kept model (one entry)
    train.main(_fast(tiny_data, seed=0, **{"model.skip_init": 0.5}), reuse=True)
    assert len(train._KEPT) == 1 and id(next(iter(train._KEPT.values())).model) not in kept_ids
    train._KEPT.clear()
    capsys.readouterr()


def test_a_worker_warms_up_once_per_config(tiny_data, capsys):
    """With the warmup on, a served run whose config (all but the seed) this worker has already
    warmed up skips it (nothing left to compile or capture) and still gives the fresh run's result;
    a config it has not seen warms up, and the first one stays known after it."""
    on = {"runtime.warmup": True, "runtime.warmup_steps_per_stage": 2}
    train._KEPT.clear()
    fresh = train.main(_fast(tiny_data, seed=1, **on))["final_val_loss"]
    train._KEPT.clear()
    skipped = []
    for seed, extra in ((0, {}), (1, {}), (0, {"optim.muon.lr": 0.05}), (2, {})):
        end = train.main(_fast(tiny_data, seed=seed, **on, **extra), reuse=True)
        warm = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if '"warmup"' in ln][-1]
        skipped.append(warm["skipped"])
        assert (warm["warmup_s"] == 0) == warm["skipped"]
        if seed == 1:
            assert end["final_val_loss"] == fresh  # no warmup here, the same result as after one
    assert skipped == [False, True, False, True]
    train._KEPT.clear()


def test_serve_runs_jobs_in_order_and_stops(tiny_data, tmp_path, capsys):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for n, seed in enumerate((0, 1)):
        cfg_file = _job_file(tmp_path, f"c{n}", _fast(tiny_data, seed=seed))
        (jobs / f"job-{n}.json").write_text(json.dumps({"preset": "tiny", "config": cfg_file, "seed": seed}))
    (jobs / "stop").touch()
    train._KEPT.clear()
    assert serve(str(jobs)) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    served = [e for e in events if e["event"] == "served"]
    assert [(e["job"], e["ok"]) for e in served] == [(0, True), (1, True)]
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 2 and kinds.count("end") == 2
    assert kinds.index("served") > kinds.index("end")  # job 0's served comes after its end
    train._KEPT.clear()


def test_serve_ends_after_a_failed_job(tiny_data, tmp_path, capsys):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    bad = _job_file(tmp_path, "bad", _fast(tiny_data, **{"debug.fail_at_step": 2, "debug.exit_code": 7}))
    (jobs / "job-0.json").write_text(json.dumps({"preset": "tiny", "config": bad, "seed": 0}))
    (jobs / "job-1.json").write_text(json.dumps({"preset": "tiny", "config": bad, "seed": 1}))
    train._KEPT.clear()
    assert serve(str(jobs)) == 7  # debug.exit_code; job 1 is never taken
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events][-2:] == ["error", "served"]
    assert events[-1] == {**events[-1], "job": 0, "ok": False}
    train._KEPT.clear()


def test_serve_bad_job_file_is_an_input_error(tmp_path, capsys):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "job-0.json").write_text(json.dumps({"preset": "no-such-preset", "seed": 0}))
    assert serve(str(jobs)) == 2
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0])["event"] == "error" and "no-such-preset" in out[0]


def test_watch_pid_ends_the_worker_and_removes_its_jobs_dir(tmp_path):
    """The process handing out jobs is SIGKILLed (as Ray does to a dead actor's children):
    the worker exits by itself with 143 and deletes its jobs directory."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = subprocess.Popen([sys.executable, "-m", "trainer.serve", "--jobs", str(jobs), "--watch-pid",
                               str(parent.pid), "--remove-jobs-dir"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert worker.poll() is None and _alive(parent.pid)
    parent.kill()
    parent.wait()
    assert worker.wait(timeout=20) == 143
    assert "is gone; exiting" in worker.stderr.read()
    assert not jobs.exists() and not _alive(parent.pid)


def test_serve_cli_needs_an_existing_jobs_dir(tmp_path):
    res = subprocess.run([sys.executable, "-m", "trainer.serve", "--jobs", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is not a directory" in res.stderr


def test_an_existing_group_of_the_wrong_backend_is_an_input_error(monkeypatch):
    """main() uses a long-lived worker's process group only if its backend fits the device."""
    import torch
    import torch.distributed as dist

    from trainer.train import InputError, init_distributed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert init_distributed(2, 0, torch.device("cpu")) is False  # fits: used, not created
    with pytest.raises(InputError, match="uses gloo but runtime.device=cuda needs nccl"):
        init_distributed(2, 0, torch.device("cuda", 0))

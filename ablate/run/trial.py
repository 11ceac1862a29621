"""What runs inside a Ray Tune trial (a Ray worker holding the run's bundle), for one run attempt.

    from ablate.run.trial import LaunchOptions, make_trainable   # used by ablate.run.driver

`trial(job, opts)` writes the run's overrides to a temporary YAML file and starts `python -m
torch.distributed.run --standalone ... -m trainer.train` under the process-tree guard
(ablate.run.launch), or hands the run to the long-lived worker its reused actor keeps
(ablate.run.workers, `resources.reuse_workers`), or runs a script arm in a working directory of its
own (ablate.run.script_trial). It reports val and step events to Tune as they arrive and then the
whole outcome as one JSON payload (`ablate_payload`), from which the driver builds the run's
RunRecord. Nothing here touches the store: a killed trial loses only its own run.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray import tune

from ablate.errors import LaunchError
from ablate.provenance import project_root
from ablate.run.launch import run_process, torchrun_command
from ablate.run.reporting import event_reporter, report_node
from ablate.spec.model import data_root_path


@dataclass(frozen=True)
class LaunchOptions:
    """How trials are placed and start the trainer. Tests swap `module` for tests/ablate/fake_trainer.py."""

    module: str = "trainer.train"
    serve_module: str = "trainer.serve"  # the long-lived worker (resources.reuse_workers)
    report_every_s: float = 2.0  # throttle of `step` reports to Tune (val events always go)
    grace_s: float = 10.0  # SIGTERM → SIGKILL delay when a run is stopped
    # The cluster's autoscaler adds nodes (`ablate run --autoscale`): a run no alive node can hold
    # is a warning, not an error, and concurrency is not capped (ablate.run.placement).
    autoscale: bool = False



def trial(job: dict, opts: LaunchOptions) -> None:
    """One run attempt: torchrun → events → Tune reports → final payload report."""
    if job.get("kind") == "script":  # a training script of the user's (ablate.spec.script)
        from ablate.run.script_trial import trial as script_trial

        return script_trial(job, opts)
    root = project_root()  # of this node's copy (e.g. a `ray job` working dir)
    overrides = dict(job["overrides"])
    if not Path(job["data_dir"]).is_absolute():  # trials run in a Ray staging dir: absolute paths
        overrides["data.data_dir"] = str(data_root_path(job["data_root"], root) / job["data_dir"])
    # In the trial's staging dir (Ray's session tree, node-local): the guard deletes the file when
    # the run ends, but Ray SIGKILLs the guard too when a driver dies, and then it stays there.
    here = os.getcwd() if os.access(os.getcwd(), os.W_OK) else None
    fd, cfg_path = tempfile.mkstemp(prefix=f"ablate-{job['run_id']}-", suffix=".yaml", dir=here)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(overrides, f, sort_keys=True)
    env = dict(os.environ)  # CUDA_VISIBLE_DEVICES stays as Ray set it
    env["OMP_NUM_THREADS"] = str(job["omp_threads"])  # Ray sets the trial's CPU count; torchrun passes it on
    env["PYTHONUNBUFFERED"] = "1"
    cmd = torchrun_command(job["ranks"], job["preset"], cfg_path, job["seed"], module=job["module"])
    on_event = event_reporter(opts.report_every_s)
    payload = report_node()
    try:
        if job.get("reuse_workers"):
            from ablate.run.workers import worker_for

            key = (job["ranks"], job["serve_module"], env["OMP_NUM_THREADS"], env.get("CUDA_VISIBLE_DEVICES"),
                   str(root))
            worker = worker_for(key, job["ranks"], cwd=str(root), env=env, module=job["serve_module"],
                                grace_s=opts.grace_s)
            payload["worker_runs_before"] = worker.served
            res = worker.run(job["preset"], cfg_path, job["seed"], on_event=on_event, timeout_s=job["timeout_s"])
        else:
            res = run_process(cmd, env=env, cwd=str(root), on_event=on_event, timeout_s=job["timeout_s"],
                              grace_s=opts.grace_s, remove_after=[cfg_path])
        start = res.first("start")
        err_event = res.last("error") or {}
        payload.update(
            ok=res.ok, error=res.error_text(), returncode=res.returncode, start=start, end=res.last("end"),
            error_type=None if res.ok or res.stopped else err_event.get("type"),
            error_event=res.last("error"),
            curve=[{k: e.get(k) for k in ("step", "val_loss", "train_time_ms")} for e in res.curve],
            steps=[{k: e.get(k) for k in ("step", "step_ms", "train_time_ms")} for e in res.steps],
            started_at=res.started_at, start_event_at=res.start_event_at, ended_at=res.ended_at,
            noise_lines=res.noise_count)
    except LaunchError as e:
        now = time.time()
        payload.update(ok=False, error=str(e), returncode=None, start=None, end=None, curve=[], steps=[],
                       started_at=now, start_event_at=None, ended_at=now, error_type=None)
    finally:
        with contextlib.suppress(FileNotFoundError):  # normally the guard removed it
            os.unlink(cfg_path)
    if not payload.get("start"):
        try:
            from trainer.config import to_dict
            from trainer.presets import load_config

            payload["resolved_config"] = to_dict(load_config(job["preset"], overrides, seed=job["seed"]))
        except Exception as e:  # noqa: BLE001 (best effort for a run that died before `start`)
            payload["resolved_config"] = {"error": str(e)}
    tune.report({"ablate_payload": json.dumps(payload)})


def make_trainable(jobs: list[dict], opts: LaunchOptions):
    """The Tune trainable of one run_requests call. A trial's config names its run (`index` in
    `jobs`, one job per run, the same for every attempt) and the attempt's `run_id`. A fresh
    function object per call: tune.with_resources sets an attribute on it."""
    def ablate_run(config: dict) -> None:
        trial({**jobs[config["index"]], "run_id": config["run_id"]}, opts)

    return ablate_run

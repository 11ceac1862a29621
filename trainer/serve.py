"""A long-lived trainer worker: run one job after another in the same ranks, keeping the compiled model.

    torchrun --standalone --nproc_per_node=2 -m trainer.serve --jobs /tmp/w1 [--watch-pid PID]
    # then, from anyone: write /tmp/w1/job-0.json, job-1.json, ... ({"preset", "config", "seed"}),
    # and /tmp/w1/stop to end it.

Every rank waits for `<jobs>/job-<n>.json` (n = 0, 1, 2, ...; write it whole, e.g. to a temporary
name and rename), loads the config exactly as `python -m trainer.train --preset P --config C
--seed S` would, and runs it with `trainer.train.main(cfg, reuse=True)`: the process group, the
imported modules and, while the model config stays the same, the model, its compiled graphs and
the micro-batches' CUDA graphs carry over, so a run after the first skips process start, rendezvous and recompiling (its weights
are re-initialised exactly as in a fresh process). Rank 0 prints the usual JSON-lines events and,
after each job, `{"event": "served", "job": n, "ok": true|false}`.

A failed job ends the worker (exit status as `trainer.train`'s: 2 bad input, 1 otherwise, or
debug.exit_code): after an error the ranks may disagree about where they are, so a fresh worker
is the safe next step. `<jobs>/stop` ends it with status 0; so does `--idle-timeout`, and
`--watch-pid P` ends it (status 143) as soon as process P is gone. Knows nothing about Ray
(ablate.run.workers drives it).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from trainer.config import ConfigError
from trainer.events import Emitter
from trainer.presets import load_config
from trainer.train import _one_line, main_exit_code

POLL_S = 0.02
WATCH_S = 0.5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie is gone too
    except OSError:
        return True  # no /proc (not Linux): kill(pid, 0) said it exists


def _cleanup(jobs_dir: str | None) -> None:
    if jobs_dir and os.environ.get("LOCAL_RANK", "0") == "0":
        import shutil

        shutil.rmtree(jobs_dir, ignore_errors=True)


def watch_parent(pid: int, remove_dir: str | None = None) -> None:
    """End this rank at once (exit 143) when process `pid` is gone, from a daemon thread. The
    process that hands out the jobs may be SIGKILLed together with the guard around us (Ray kills a
    dead actor's children), which would otherwise leave this worker running for ever."""
    import threading

    def loop() -> None:
        while _alive(pid):
            time.sleep(WATCH_S)
        try:  # stderr may be a pipe nobody reads any more (the guard was killed): exit regardless
            print(f"[trainer.serve] process {pid} (which hands out the jobs) is gone; exiting", file=sys.stderr,
                  flush=True)
        finally:
            _cleanup(remove_dir)
            os._exit(143)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def job_path(jobs_dir: str, n: int) -> str:
    return os.path.join(jobs_dir, f"job-{n}.json")


def _wait_for_job(jobs_dir: str, n: int, idle_timeout_s: float) -> dict | None:
    """The job file's contents, or None on `stop` (or after idle_timeout_s without a job)."""
    path, stop = job_path(jobs_dir, n), os.path.join(jobs_dir, "stop")
    since = time.monotonic()
    while True:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if os.path.exists(stop) or not os.path.isdir(jobs_dir):
            return None
        if idle_timeout_s and time.monotonic() - since > idle_timeout_s:
            return None
        time.sleep(POLL_S)


def serve(jobs_dir: str, idle_timeout_s: float = 0.0) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    ev = Emitter(enabled=rank0)
    n = 0
    try:
        while True:
            job = _wait_for_job(jobs_dir, n, idle_timeout_s)
            if job is None:
                return 0
            code = _run_job(job, ev, rank0)
            ev.emit("served", job=n, ok=code == 0)
            if code != 0:
                return code
            n += 1
            gc.collect()
    except KeyboardInterrupt:
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run_job(job: dict, ev: Emitter, rank0: bool) -> int:
    """One job, with trainer.train's exit codes (the `error` event is printed by main). The
    first job creates the process group, which main() then keeps for the later ones."""
    try:
        cfg = load_config(job["preset"], {}, job.get("config"), job.get("seed"))
    except (ConfigError, KeyError, TypeError) as e:
        if rank0:
            ev.emit("error", type=type(e).__name__, message=_one_line(e))
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return main_exit_code(cfg, rank0, reuse=True)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.serve",
                                 description="Run trainer jobs one after another in the same ranks (see module doc).")
    ap.add_argument("--jobs", required=True, help="directory polled for job-<n>.json and stop")
    ap.add_argument("--idle-timeout", type=float, default=0.0,
                    help="exit after this many seconds without a job (0 = wait for ever)")
    ap.add_argument("--watch-pid", type=int, default=0,
                    help="exit as soon as this process is gone (the one writing the jobs)")
    ap.add_argument("--remove-jobs-dir", action="store_true",
                    help="delete the --jobs directory when the worker ends, however it ends (local rank 0)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.jobs):
        print(f"error: --jobs {args.jobs!r} is not a directory; create it first", file=sys.stderr)
        return 2
    remove = args.jobs if args.remove_jobs_dir else None
    if args.watch_pid:
        watch_parent(args.watch_pid, remove)
    try:
        return serve(args.jobs, args.idle_timeout)
    finally:
        _cleanup(remove)


if __name__ == "__main__":
    sys.exit(cli())

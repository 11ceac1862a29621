"""Long-lived trainer workers: one torchrun gang (trainer.serve) runs run after run. No Ray.

    from ablate.run.workers import Worker
    w = Worker(2, cwd=root, env=env)
    res = w.run("tiny", "/tmp/ov.yaml", seed=0, on_event=print)   # a LaunchResult, as run_process's
    res = w.run("tiny", "/tmp/ov.yaml", seed=1)                   # same ranks, no new processes
    w.close()

What a fresh process pays for every run (interpreter + torch import, rendezvous, NCCL set-up,
dynamo tracing of every graph even with warm inductor caches, teardown) is paid once per worker;
the trainer keeps the model and its compiled graphs while the model config stays the same
(trainer/serve.py). A worker lives under the same guard as a single run (ablate.run.launch): it dies
with the process that started it, however that dies: the guard kills it when that process's pipe
closes, and the ranks themselves exit when it is gone (`--watch-pid`), for Ray SIGKILLs a dead
actor's children, the guard included. A run that fails, times out or is cancelled
ends its worker; the next run starts a fresh one.

`resources.reuse_workers: true` in a spec turns this on: Tune reuses each trial's actor
(`reuse_actors=True`) and the actor keeps its worker in `CURRENT` between trials.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from typing import Callable

from ablate.run.launch import GUARD_GRACE_S, LaunchResult, Guarded

SERVE_MODULE = "trainer.serve"


def serve_command(nproc: int, jobs_dir: str, module: str = SERVE_MODULE, python: str = sys.executable,
                  watch_pid: int | None = None) -> list[str]:
    """torchrun → trainer.serve; the ranks exit when process `watch_pid` (default: this one) is gone."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, "--jobs", jobs_dir, "--watch-pid", str(watch_pid or os.getpid()), "--remove-jobs-dir"]


class Worker:
    """A trainer.serve gang of `nproc` ranks, started now, fed one job at a time by `run`."""

    def __init__(self, nproc: int, *, cwd: str | None = None, env: dict[str, str] | None = None,
                 module: str = SERVE_MODULE, grace_s: float = GUARD_GRACE_S) -> None:
        self.nproc = nproc
        self.started_at = time.time()
        self.jobs_dir = tempfile.mkdtemp(prefix="ablate-worker-")
        self.served = 0  # jobs handed to this worker so far
        self._g = Guarded(serve_command(nproc, self.jobs_dir, module), env=env, cwd=cwd, grace_s=grace_s,
                           remove_after=[self.jobs_dir])
        self._dead = False

    @property
    def alive(self) -> bool:
        return not self._dead and self._g.proc.poll() is None

    def run(self, preset: str, config_file: str | None, seed: int, *,
            on_event: Callable[[dict], None] | None = None, timeout_s: float | None = None,
            stop: threading.Event | None = None) -> LaunchResult:
        """Hand the worker one run and read its events up to `served`. The result's `started_at`
        is the job's hand-over, or the worker's start for its first job (so launch time counts)."""
        if not self.alive:
            raise RuntimeError("this worker has ended; start a new one")
        n = self.served
        res = LaunchResult(started_at=self.started_at if n == 0 else time.time())
        self._g.tail.clear()
        tmp = os.path.join(self.jobs_dir, f".job-{n}.tmp")
        with open(tmp, "w") as f:
            json.dump({"preset": preset, "config": config_file, "seed": seed}, f)
        os.replace(tmp, os.path.join(self.jobs_dir, f"job-{n}.json"))  # whole, never half-written
        self.served += 1
        served: list[dict] = []

        def until(ev: dict) -> bool:
            if ev.get("event") == "served" and ev.get("job") == n:
                served.append(ev)
                return True
            return False

        finished = False
        try:
            finished = self._g.consume(res, on_event=on_event, timeout_s=timeout_s, stop=stop, until=until)
        finally:
            if finished and served[0].get("ok") and res.stopped is None:
                res.returncode = 0
            else:  # the worker ends after a failed job (trainer.serve), or was killed: wait for it
                self._dead = True
                if not finished:
                    res.returncode = self._g.close()
                else:
                    res.returncode = self._wait_exit()
            res.stderr_tail = list(self._g.tail)
            res.ended_at = time.time()
        return res

    def _wait_exit(self) -> int:
        try:
            self._g.proc.wait(timeout=self._g.grace_s + 30.0)
        except Exception:  # noqa: BLE001 (hung after a failed job: kill it)
            self._g.kill()
        return self._g.close()

    def close(self) -> None:
        """Ask the worker to stop (the `stop` file), kill it if it does not, wait for it."""
        if self._g.proc.poll() is None:
            try:
                open(os.path.join(self.jobs_dir, "stop"), "w").close()
                self._g.proc.wait(timeout=10.0)
            except Exception:  # noqa: BLE001
                self._g.kill()
        self._dead = True
        self._g.close()


# The worker of this process (a Tune trial actor reused across trials): one at a time.
CURRENT: dict[str, object] = {}


def worker_for(key: tuple, nproc: int, *, cwd: str, env: dict[str, str], module: str = SERVE_MODULE,
               grace_s: float = GUARD_GRACE_S) -> Worker:
    """This process's worker for `key` (ranks, devices, environment): the live one if it matches,
    else a new one (the old one is closed first, freeing its GPUs)."""
    w = CURRENT.get("worker")
    if isinstance(w, Worker) and w.alive and CURRENT.get("key") == key:
        return w
    if isinstance(w, Worker):
        w.close()
    w = Worker(nproc, cwd=cwd, env=env, module=module, grace_s=grace_s)
    CURRENT.update(worker=w, key=key)
    return w


__all__ = ["Worker", "worker_for", "serve_command", "SERVE_MODULE"]

"""Ray Tune orchestration: one Tune trial per run attempt, torchrun inside it, Parquet from the driver.

    python -m ablate run experiments/smoke.yaml              # through ablate.cli

    from ablate.run.driver import run_experiment, run_requests
    results = run_experiment(spec, Store("results"))          # every (arm, seed), resumable
    results = run_requests(spec, [make_request(spec, "baseline", 0)], store)   # any list (search)

Each trial (a Ray worker holding the run's bundle: all its GPUs, or CPUs for CPU ranks) runs
ablate.run.trial: torchrun under the process-tree guard, a long-lived worker, or a script arm;
val/step events reported to Tune as they arrive, everything in one final report. This module is
the driver side only: the Ray session, the queue of attempts, the rows. The driver's Tune callback writes the run to the store as each
trial ends, so a killed driver loses at most the runs in flight. One Tune experiment runs all the
requests of a call; Tune takes its trials from a queue of attempts (`TuneRuns`, `AttemptQueue`), one trial
per attempt, so every attempt has its own row and run id. A failed attempt is relaunched at once,
as the next attempt (`-a2`, ...) at the head of the queue, while the other runs go on; Tune itself
never restarts a trial (max_failures=0). `retries` bounds the attempts; a run the trainer rejected
as bad input (exit 2: config, data, world size) is not retried. A run whose loss went non-finite
is `diverged` (`divergence`): an outcome of its config and seed, recorded once and never retried.
The first store write that fails, or losing the experiment lock (ablate.store.lock), stops everything at
once: the runs in flight are cancelled and nothing else starts, retries included. A script arm
(your own train_gpt.py, ablate.spec.script) takes the same path: its trial runs the script in a working
directory of its own (ablate.run.script_trial) and reports the same events and payload.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import ray
from ray import tune
from ray.tune.search import Searcher

from ablate import __version__
from ablate.errors import AblateError, Interrupted, LockLost, StoreError
from ablate.spec.matrix import PlannedRun, RunRequest, expand, plan
from ablate.run.progress import NullProgress
from ablate.run.trial import LaunchOptions, make_trainable
from ablate.provenance import driver_info
from ablate.run.placement import check_cluster, concurrency_limit, run_bundle
from ablate.store.record import CurvePoint, RunRecord, StepTime
from ablate.spec.model import CACHE_KEY, Spec
from ablate.store.parquet import Store

log = logging.getLogger("ablate")

# `error` event types that mean the loss diverged (a status, not a failure to retry)
DIVERGENCE_ERRORS = ("Diverged", "DivergenceError", "NonFiniteLoss")
# Ray's own console output: quiet (the driver shows its own progress). Set before Tune starts.
_RAY_QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
# `error` event types of the trainer's input errors (trainer.train.INPUT_ERRORS, and argparse's
# usage errors): the same input fails the same way every time, so such a run is never retried.
INPUT_ERROR_TYPES = ("ConfigError", "DataError", "InputError", "UsageError")
TUNE_DIR_PREFIX = "ablate-tune-"  # + "<driver pid>-": Tune's scratch dir of one run_requests call


@dataclass
class RunResult:
    """The outcome of one request. `row` is the runs row: the RunRecord written now, or the row
    found in the store (a dict); both map column → value."""

    request: RunRequest
    status: str  # "ok" | "diverged" | "failed" | "cancelled" | "not-run"
    run_id: str | None = None
    row: Mapping[str, Any] | None = None
    attempts: int = 0  # attempts launched by this call
    reused: bool = False  # the store already had the outcome; nothing ran
    input_error: bool = False  # the trainer rejected its input (config, data, world size): not retried

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------------
# Ray session
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While an embedded cluster starts: its node address is 127.0.0.1, so every Ray process
    (GCS, raylet, workers, agents, the two Prometheus endpoints) listens on loopback only.

    Ray 2.60 turns a requested 127.0.0.1 into the machine's interface address unless
    `ray_constants.ENABLE_RAY_CLUSTER` is false (the macOS/Windows single-machine mode); its
    servers bind to loopback only when the node address is loopback. The flag is set for the
    ray.init call and restored after. tests/ablate/test_e2e.py lists the listening sockets."""
    from ray._private import ray_constants

    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def init_embedded_ray(**kwargs: Any) -> None:
    """Start the embedded local cluster as `ablate run` does: loopback only, no dashboard, quiet.
    Token authentication stays as Ray sets it (on by default in 2.60)."""
    # "token auth is enabled by default" (auth stays on; the notice is noise for an embedded cluster)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    opts: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False,
                            "_node_ip_address": "127.0.0.1", **kwargs}
    with _loopback_node():
        ray.init(address="local", **opts)


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Connect to `address` (or $RAY_ADDRESS, e.g. inside `ray job submit`), else start an
    embedded local cluster (`address="local"`: never attaches to a stale `ray start` cluster;
    listens on loopback only). Reuses an already initialised Ray without shutting it down."""
    if ray.is_initialized():
        yield ray
        return
    for k, v in _RAY_QUIET_ENV.items():
        os.environ.setdefault(k, v)
    addr = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        if addr == "local":
            init_embedded_ray()
        else:  # a cluster: its own addresses and token authentication, as `ray start` set them
            ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise AblateError(f"cannot connect to Ray at address={addr!r}: {e}; fix: check --address / RAY_ADDRESS "
                          "(e.g. 127.0.0.1:6379 after `ray start --head`), or omit it for an embedded "
                          "local cluster") from None
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.getsignal(signal.SIGTERM) if main else None
    if main:  # SIGTERM → SIGINT: Tune stops gracefully and in-flight runs get `cancelled` rows
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield ray
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term)
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------
@dataclass
class Attempt:
    planned: PlannedRun
    order: int  # launch order in the experiment (given when Tune takes the attempt from the queue)
    job: dict = field(default_factory=dict)
    index: int = 0  # which run of the call (its job in the trainable's list)
    started_at: float | None = None  # when Tune started the trial (driver clock)
    node: dict = field(default_factory=dict)  # node_id/node_ip/hostname, from the trial's first report
    status: str | None = None  # set when the row is written
    row: RunRecord | None = None
    input_error: bool = False  # failed on bad input: not retried

    @property
    def request(self) -> RunRequest:
        return self.planned.request

    @property
    def run_id(self) -> str:
        return self.request.run_id(self.planned.attempt)


def make_job(spec: Spec, req: RunRequest, run_id: str, opts: LaunchOptions) -> dict:
    """What a trial needs to run `req` as attempt `run_id` (another attempt: the same job, its own run_id)."""
    r = spec.resources
    if spec.is_script_arm(req.arm):
        from ablate.run.script_trial import job

        return job(spec, req, run_id)
    data_dir = spec.resolve(req.arm, req.overrides).data.data_dir
    overrides = dict(req.overrides)
    if r.compile_cache_dir:  # where this node's compile cache lives; not part of the config hash
        overrides[CACHE_KEY] = r.compile_cache_dir
    return {"run_id": run_id, "arm": req.arm, "seed": req.seed, "preset": spec.trainer.preset,
            "overrides": overrides, "data_dir": data_dir, "data_root": spec.data_root,
            "ranks": r.ranks, "omp_threads": r.omp_threads, "timeout_s": r.timeout_s,
            "module": opts.module, "serve_module": opts.serve_module, "reuse_workers": r.reuse_workers}


def is_input_error(payload: dict) -> bool:
    """The trainer rejected the run's input (its `error` event names an input error)."""
    return not payload.get("ok") and payload.get("error_type") in INPUT_ERROR_TYPES


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def divergence(payload: dict) -> str | None:
    """Why an attempt diverged, or None. Diverged = the loss went non-finite: a `val` event whose
    val_loss is null/NaN/inf (the trainer writes non-finite floats as null) at any eval, an `end`
    event without a finite final_val_loss, or a trainer `error` event of a divergence type
    (DIVERGENCE_ERRORS). Deterministic for a given config and seed, so never retried."""
    bad = [c.get("step") for c in payload.get("curve") or [] if not _finite(c.get("val_loss"))]
    if bad:
        more = f" (and {len(bad) - 1} later eval(s))" if len(bad) > 1 else ""
        return f"diverged: val_loss is not finite at step {bad[0]}{more}"
    end = payload.get("end")
    if end and not _finite(end.get("final_val_loss")):
        return "diverged: the `end` event has no finite final_val_loss"
    err = payload.get("error_event") or {}
    if err.get("type") in DIVERGENCE_ERRORS:
        return f"diverged: {err.get('type')}: {err.get('message', '')}".rstrip(": ")
    return None


def build_row(spec: Spec, a: Attempt, payload: dict,
              driver: dict) -> tuple[RunRecord, list[CurvePoint], list[StepTime]]:
    """The runs record (ablate.store.record.RunRecord) and the curve/step rows of one finished attempt,
    from the trial's payload (trainer and script runs alike)."""
    req, r = a.request, spec.resources
    start = payload.get("start") or {}
    end = payload.get("end") or {}
    env = start.get("env") or {}
    data = start.get("data") or {}  # what the shards were (trainer/data.py data_provenance)
    started, ended = payload.get("started_at") or time.time(), payload.get("ended_at") or time.time()
    status = payload.get("status") or ("ok" if payload.get("ok") else "failed")
    error = None if status == "ok" else (payload.get("error") or "unknown error")
    diverged = divergence(payload) if status in ("ok", "failed") else None
    if diverged:
        status, error = "diverged", diverged + (f"\n{error}" if error else "")
    elif status == "failed" and is_input_error(payload):
        error = f"input error (not retried): {error}"
    config = start.get("config") or payload.get("resolved_config") or a.job.get("script_config") or {}
    record = RunRecord(
        experiment=spec.name, arm=req.arm, seed=req.seed, run_id=a.run_id,
        attempt=a.planned.attempt, round=req.round, order=a.order, source=req.source,
        search_trial=req.search_trial, config_hash=req.config_hash,
        config_json=json.dumps(config, sort_keys=True), overrides_json=json.dumps(req.overrides, sort_keys=True),
        status=status, error=error,
        final_val_loss=end.get("final_val_loss"), train_time_ms=end.get("train_time_ms"),
        steps=end.get("steps"), tokens=end.get("tokens"), peak_mem_mib=end.get("peak_mem_mib"),
        warmup_s=end.get("warmup_s"), compile_s=end.get("compile_s"), eval_s=end.get("eval_s"),
        world_size=start.get("world_size") or r.ranks,
        node_id=payload.get("node_id"), node_ip=payload.get("node_ip"),
        hostname=env.get("hostname") or payload.get("hostname"),
        gpu_model=env.get("gpu_name"), gpu_count=env.get("gpu_count", r.gpus_per_run) or 0,
        gpu_uuids=",".join(env.get("gpu_uuids") or []),
        python_version=env.get("python") or driver.get("python"),
        torch_version=env.get("torch") or driver.get("torch"),
        triton_version=env.get("triton"), cuda_version=env.get("cuda"), driver=env.get("driver"),
        git_commit=env.get("git_commit") or driver.get("git_commit"), ablate_version=__version__,
        started_at=started, ended_at=ended,
        launch_s=(payload["start_event_at"] - started) if payload.get("start_event_at") else None,
        wall_s=max(0.0, ended - started),
        worker_runs_before=payload.get("worker_runs_before"),
        attn_backend=(config.get("model") or {}).get("attn_backend"),
        data_synthetic=data.get("synthetic"), data_hash=data.get("hash"),
        script_sha256=a.job.get("script_sha256"),
    )
    curve = [CurvePoint.for_run(record, c) for c in payload.get("curve") or []]
    steps = [StepTime.for_run(record, s) for s in payload.get("steps") or []]
    return record, curve, steps


class TuneRuns(tune.Callback):
    """The attempts of one run_requests call: the queue Tune takes its trials from (`AttemptQueue`), and
    the Tune callback that shows progress, marks runs in flight and writes each attempt's row as
    its trial ends.

    The queue starts with the first attempt of every run, in request order. A failed attempt that
    has attempts left (`retries`) and did not fail on bad input goes back to the head of the queue
    as the run's next attempt the moment its row is written, so it starts in the slot it freed
    while the other runs go on. `store_error` holds the first failed store write; with it (or a
    lost lock) `stop_reason` is set, nothing more is handed out, and `_StopAll` makes Tune stop
    every trial."""

    def __init__(self, spec: Spec, todo: list[PlannedRun], jobs: list[dict], store: Store, progress: Any,
                 lock: Any = None, first_order: int = 0) -> None:
        self.spec, self.todo, self.jobs = spec, todo, jobs
        self.store, self.progress, self.lock = store, progress, lock
        self.driver = driver_info()
        self.store_error: str | None = None
        self.queue: deque[tuple[int, PlannedRun]] = deque(enumerate(todo))  # (run index, its next attempt)
        self.next_order = first_order
        self.attempts: list[Attempt] = []  # launched, in launch order
        self.trials: dict[str, Attempt] = {}  # Tune trial id → attempt
        self.live: set[str] = set()  # trial ids Tune has not yet reported ended

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks and search algorithm into tuner.pkl (for Tuner.restore, which
        # ablate does not use); the store and the live display do not pickle.
        return {}

    def stop_reason(self) -> str | None:
        if self.store_error is not None:
            return self.store_error
        if self.lock is not None and self.lock.lost.is_set():
            return self.lock.reason
        return None

    # ---- the queue (called through AttemptQueue) ---------------------------------------------------
    def suggest(self, trial_id: str) -> dict | str | None:
        """The next attempt's trial config; None while attempts are in flight (one may fail and
        come back as a retry); FINISHED when every run has an outcome or the experiment stops."""
        if self.stop_reason() is not None:
            return Searcher.FINISHED
        if not self.queue:
            return None if self.live else Searcher.FINISHED
        index, planned = self.queue.popleft()
        a = Attempt(planned, self.next_order, index=index)
        a.job = {**self.jobs[index], "run_id": a.run_id}
        self.next_order += 1
        self.attempts.append(a)
        self.trials[trial_id] = a
        self.live.add(trial_id)
        return {"index": index, "run_id": a.run_id}

    def ended(self, trial_id: str) -> None:
        self.live.discard(trial_id)

    def results(self) -> list[RunResult]:
        """One RunResult per planned run (`todo` order): its last attempt, and how many started."""
        last: dict[int, Attempt] = {}
        started: dict[int, int] = {}
        for a in self.attempts:
            last[a.index] = a
            started[a.index] = started.get(a.index, 0) + (a.started_at is not None)
        out = []
        for i, p in enumerate(self.todo):
            a = last.get(i)
            if a is None:
                out.append(RunResult(p.request, "not-run", p.request.run_id(p.attempt)))
            else:
                out.append(RunResult(p.request, a.status or "not-run", a.run_id, a.row, started[i],
                                     input_error=a.input_error))
        return out

    # ---- Tune callback -----------------------------------------------------------------------
    def _store_failed(self, e: StoreError) -> None:
        if self.store_error is None:
            self.store_error = str(e)

    def on_trial_start(self, iteration, trials, trial, **info):
        a = self.trials[trial.trial_id]
        a.started_at = time.time()
        self.progress.started(a.run_id, a.request.arm, a.request.seed)
        if self.stop_reason() is not None:  # Tune stops it at its next step
            return
        try:
            self.store.mark_inflight(self.spec.name, a.run_id, {
                "run_id": a.run_id, "arm": a.request.arm, "seed": a.request.seed, "started_at": time.time(),
                "driver_host": self.driver["hostname"], "driver_pid": os.getpid()})
        except StoreError as e:
            self._store_failed(e)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        a = self.trials[trial.trial_id]
        if "ablate_node" in result:
            a.node = json.loads(result["ablate_node"])
        elif "ablate_payload" not in result:
            self.progress.update(a.run_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        raw = (trial.last_result or {}).get("ablate_payload")
        payload = json.loads(raw) if raw else {"ok": False, "error": "trial ended without a result (Ray)"}
        if not raw and self.stop_reason() is not None:  # stopped by _StopAll, not a failure of the run
            payload = {"status": "cancelled", "error": f"cancelled: the experiment stopped: {self.stop_reason()}"}
        self.record(self.trials[trial.trial_id], payload)

    def on_trial_error(self, iteration, trials, trial, **info):
        # e.g. the run was lost with its node: a failed attempt like any other (retried)
        a = self.trials[trial.trial_id]
        text = trial_error(trial)
        death = node_death(a.node, text)
        error = f"Ray trial failed: {death}. Ray: {text}" if death else f"Ray trial failed: {text}"
        self.record(a, {"ok": False, "error": error[:4000]})

    def record(self, a: Attempt, payload: dict) -> None:
        """Write the attempt's row; queue the run's next attempt if it failed and may be retried."""
        if a.status is not None:
            return
        payload = {**a.node, **payload}  # a trial lost with its node still names the node
        row, curve, steps = build_row(self.spec, a, payload, self.driver)
        try:
            if payload.get("script_log"):  # a script run's log (ablate.run.script_trial), before its row
                from ablate.run.script_trial import write_log

                write_log(self.store, self.spec.name, a.run_id, payload)
            self.store.write_run(row, curve, steps)
        except StoreError as e:
            self._store_failed(e)
        a.status, a.row = row["status"], row
        a.input_error = row["status"] == "failed" and is_input_error(payload)
        p = a.planned
        retry = (row["status"] == "failed" and not a.input_error and p.attempts_left > 1
                 and self.stop_reason() is None)
        if retry:  # the head of the queue: Tune starts it in the slot this attempt freed
            self.queue.appendleft((a.index, PlannedRun(p.request, "todo", p.attempt + 1, p.attempts_left - 1)))
        self.progress.finished(a.run_id, row["status"], row["final_val_loss"], row["wall_s"],
                               retries_left=p.attempts_left - 1 if retry else 0, error=row["error"])

    def cancel_unfinished(self, why: str) -> bool:
        """`cancelled` rows for attempts that started but never finished (driver interrupted, or
        the experiment stopped); True if some run has no outcome (an attempt unfinished or queued)."""
        for a in self.attempts:
            if a.status is None and a.started_at is not None:
                self.record(a, {"status": "cancelled", "error": f"cancelled: {why}",
                                "started_at": a.started_at, "ended_at": time.time()})
        return bool(self.queue) or any(a.status is None for a in self.attempts)


class AttemptQueue(Searcher):
    """Tune's search algorithm here: hands out `TuneRuns`' queue of attempts, one trial each."""

    def __init__(self, runs: TuneRuns) -> None:
        super().__init__()
        self.runs = runs

    def __getstate__(self) -> dict:  # pickled into tuner.pkl, like the callback
        return {}

    def suggest(self, trial_id: str) -> dict | str | None:
        return self.runs.suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune calls this before the callback's on_trial_complete/on_trial_error, in the same step:
        # a retry is queued before Tune asks for the next trial.
        self.runs.ended(trial_id)

    def save(self, checkpoint_path: str) -> None:  # nothing to restore: the store is the state
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


class _StopAll(tune.Stopper):
    """Stops the whole Tune run once the runs have a stop reason (polled by Tune every step)."""

    def __init__(self, runs: TuneRuns) -> None:
        self.runs = runs

    def __getstate__(self) -> dict:  # pickled with the RunConfig, like the callback
        return {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return getattr(self, "runs", None) is not None and self.runs.stop_reason() is not None


# Ray's words for an actor it lost; which one a driver sees when a node dies depends on whether
# the broken connection or the GCS's missed health checks reach it first
_LOST_ACTOR = ("node has died", "node was terminated", "temporarily unavailable", "Socket closed",
               "ActorDiedError", "ActorUnavailableError", "actor died")
NODE_DEATH_WAIT_S = 20.0  # Ray's default health checks declare a silent node dead within ~15-25 s


def node_death(node: Mapping[str, Any], error: str, wait_s: float = NODE_DEATH_WAIT_S,
               nodes: Any = None) -> str | None:
    """ "the run's node <id> (<host>, <ip>) died" when a trial's error is a lost actor and the node the
    trial reported (`Attempt.node`) is dead in Ray's node table, else None. The driver can hear of
    the broken connection before the GCS declares the node dead, so this polls for up to `wait_s`
    (only for a lost-actor error on a node still listed alive)."""
    node_id = node.get("node_id")
    if not node_id or not any(w in error for w in _LOST_ACTOR):
        return None
    nodes = nodes or ray.nodes
    deadline = time.monotonic() + wait_s
    while True:
        try:
            entry = next((n for n in nodes() if n.get("NodeID") == node_id), None)
        except Exception:  # noqa: BLE001 (no GCS: say nothing rather than guess)
            return None
        if entry is not None and not entry.get("Alive", True):
            where = ", ".join(str(v) for v in (node.get("hostname"), node.get("node_ip")) if v)
            return f"the run's node {node_id}{f' ({where})' if where else ''} died"
        if entry is None or time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def trial_error(trial: Any) -> str:
    """Tune's text of a trial's error (e.g. "The actor died because its node has died ..."). At
    on_trial_error time it is in the trial's local error file; storage gets it later."""
    try:
        path = trial.error_file
        if path and os.path.exists(path):
            with open(path, errors="replace") as f:
                lines = [line for line in f.read().strip().splitlines() if not line.startswith("Failure # ")]
            # the cause first (the CLI shows the first line): "The actor died because its node has died ..."
            cause = next((line for line in lines if "died because" in line), None)
            if cause:
                lines = [cause.strip()] + [line for line in lines if line is not cause]
            if lines:
                return "\n".join(lines)
        return str(trial.get_error() or "Ray trial error")
    except Exception as e:  # noqa: BLE001 (the row gets written either way)
        return f"Ray trial error ({e})"


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune logs warnings about resuming with Tuner.restore and missing result files that do not
    apply here (resume = run the spec again; results live in the store)."""
    names = ("ray.tune", "ray.train", "ray.air")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def _run_tune(spec: Spec, todo: list[PlannedRun], store: Store, progress: Any, opts: LaunchOptions,
              lock: Any = None, first_order: int = 0) -> list[RunResult]:
    """Run the planned runs as one Tune experiment, in order, each failed attempt relaunched as
    soon as it fails while attempts are left. One RunResult per planned run, in `todo` order.
    Raises Interrupted when the driver was interrupted, StoreError after the first failed store
    write, LockLost when the lock was lost: each stops everything at once (runs in flight
    cancelled, nothing else started)."""
    jobs = [make_job(spec, p.request, p.request.run_id(p.attempt), opts) for p in todo]
    if any(j.get("kind") == "script" for j in jobs):  # each script's text, once per sha256
        from ablate.run.script_trial import store_code

        store_code(store, spec.name, jobs)
    nodes = ray.nodes()
    # ONE bundle per run (all its GPUs on one node; + gpu_node for 8-GPU runs): ablate.run.placement
    resources = tune.PlacementGroupFactory([run_bundle(spec.resources, nodes)])
    trainable = tune.with_resources(make_trainable(jobs, opts), resources)
    runs = TuneRuns(spec, todo, jobs, store, progress, lock, first_order)
    storage = tempfile.mkdtemp(prefix=f"{TUNE_DIR_PREFIX}{os.getpid()}-")
    # Autoscaling (no cap): every run may be a pending placement group the autoscaler acts on; a
    # run never has two attempts in flight, so len(todo) is the same as no cap.
    limit = concurrency_limit(spec, nodes, opts.autoscale) or len(todo)
    tuner = tune.Tuner(
        trainable,
        # num_samples: every attempt the runs' budgets allow. reuse_workers: a trial's actor (and the
        # trainer worker it keeps) serves the next trial.
        tune_config=tune.TuneConfig(search_alg=AttemptQueue(runs), max_concurrent_trials=limit,
                                    num_samples=sum(p.attempts_left for p in todo),
                                    reuse_actors=spec.resources.reuse_workers),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=0, callbacks=[runs],
                                  stop=_StopAll(runs), failure_config=tune.FailureConfig(max_failures=0)),
    )
    interrupted = False
    try:
        with _quiet_tune():
            tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        why = runs.stop_reason()
        if why is not None and runs.store_error is not None:
            why = "the experiment stopped after a failed store write"
        elif why is not None:
            why = "the experiment stopped: its lock was lost"
        running = sum(a.status is None and a.started_at is not None for a in runs.attempts)
        interrupted |= runs.cancel_unfinished(why or "the driver was interrupted")
        shutil.rmtree(storage, ignore_errors=True)
    unstarted = sum(a.started_at is None for a in runs.attempts) + len(runs.queue)
    done = f"{running} run(s) in flight were cancelled, {unstarted} not started"
    if runs.store_error is not None:
        raise StoreError(f"stopped at the first failed store write: {runs.store_error}\n{done}; rows written "
                         "before it are kept; run the same spec again to resume once the store is writable")
    if lock is not None and lock.lost.is_set():
        raise LockLost(f"stopped: {lock.reason}\n{done}")
    if interrupted:
        raise Interrupted("interrupted: finished runs are in the store; in-flight runs were killed and "
                          "recorded as cancelled; run the same spec again to resume")
    return runs.results()


def run_requests(spec: Spec, requests: list[RunRequest], store: Store, address: str | None = None, *,
                 progress: Any = None, options: LaunchOptions | None = None, lock: Any = None) -> list[RunResult]:
    """Obtain an outcome for each request: reuse `ok` rows in the store, run the rest through
    Tune with retries (spec.retries, each failed attempt relaunched as soon as it fails), write
    every attempt to the store. Results in request order. The caller holds the experiment's lock
    (`lock`, ablate.store.lock; run_experiment and run_search take it); losing it stops the runs.

    Raises Interrupted when the driver is stopped (rows written so far stay), StoreError at the
    first failed store write, LockLost when the lock was lost."""
    progress = progress or NullProgress()
    opts = options or LaunchOptions()
    unique = list({req.key: req for req in requests}.values())
    if lock is not None:
        lock.check()
    with ray_session(address):
        warning = check_cluster(spec, ray.nodes(), autoscale=opts.autoscale)
        if warning:
            log.warning("warning: %s", warning)
        runs_df = store.runs(spec.name)
        planned = plan(unique, runs_df, spec.retries)
        next_order = int(runs_df["order"].max()) + 1 if len(runs_df) else 0
        results: dict[tuple, RunResult] = {}
        progress.add(len(planned))
        progress.skipped(sum(p.state == "done" for p in planned), sum(p.state == "exhausted" for p in planned))
        rows = {r["run_id"]: r for r in runs_df.to_dict("records")} if len(runs_df) else {}
        for p in planned:
            if p.state == "done":  # an ok or a diverged row: both are outcomes
                row = rows.get(p.done_run_id)
                results[p.request.key] = RunResult(p.request, (row or {}).get("status") or "ok", p.done_run_id, row,
                                                   reused=True)
            elif p.state == "exhausted":
                last = p.request.run_id(p.attempt - 1)
                results[p.request.key] = RunResult(p.request, "failed", last, rows.get(last), reused=True)
        todo = [p for p in planned if p.state == "todo"]
        if todo:
            for p, res in zip(todo, _run_tune(spec, todo, store, progress, opts, lock, next_order)):
                results[p.request.key] = res
    return [results[req.key] for req in requests]


def arms_to_continue_stored(store: Store, spec: Spec) -> list[str]:
    """Arms that get another seed round: ablate.analysis.sequential decides; without it, every arm."""
    try:
        from ablate.analysis.sequential import arms_to_continue
    except ImportError:
        return list(spec.arms)
    runs = store.runs(spec.name)
    if len(runs):  # each arm's current config only (runs of an earlier override are another experiment)
        current = {arm: spec.config_hash(arm) for arm in spec.arms}
        runs = runs[runs["config_hash"] == runs["arm"].map(current)]
    keep = list(arms_to_continue(runs, spec))
    if keep and spec.baseline not in keep:
        keep.append(spec.baseline)  # variants are compared seed-by-seed with the baseline
    return [a for a in spec.arms if a in keep]


def clean_stale_tune_dirs(tmp: str | None = None) -> list[str]:
    """Remove Tune scratch dirs (`ablate-tune-<pid>-*` in the temp dir) of drivers on this machine
    that are no longer running (a killed driver cannot remove its own). Returns the removed paths."""
    from ablate.store.lock import pid_alive

    root = Path(tmp or tempfile.gettempdir())
    removed = []
    for d in root.glob(f"{TUNE_DIR_PREFIX}*-*"):
        pid = d.name[len(TUNE_DIR_PREFIX):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid), None):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def prepare_experiment(spec: Spec, store: Store, progress: Any = None) -> None:
    """At the start of a driver that holds the lock: copy the spec into the store and clean what a
    killed driver left behind: in-flight markers (their runs were never written, so they run
    again), hidden temporary files of interrupted writes, its Tune scratch dirs on this machine."""
    progress = progress or NullProgress()
    store.write_bytes(spec.name, "spec.yaml", (spec.text or json.dumps(spec.model_dump())).encode())
    from ablate.spec.script import store_arms

    store_arms(store, spec)  # script arms: each arm's identity, for tables and status (script_arms.json)
    stale = store.inflight(spec.name)
    store.clear_inflight(spec.name)
    tmp = store.clean_temporary(spec.name)
    dirs = clean_stale_tune_dirs()
    note = getattr(progress, "note", None)
    if (stale or tmp or dirs) and note is not None:
        ids = ", ".join(str(m.get("run_id")) for m in stale[:5]) + (" ..." if len(stale) > 5 else "")
        note(f"cleaned up after a driver that was killed: {len(stale)} in-flight marker(s)"
             + (f" ({ids}; these runs start again)" if stale else "")
             + f", {tmp} temporary file(s), {len(dirs)} Tune scratch dir(s)")


@contextlib.contextmanager
def held_lock(store: Store, experiment: str, lock: Any = None, take_over: bool = False,
              progress: Any = None) -> Iterator[Any]:
    """`lock` if the caller holds it, else the experiment's lock taken now (released after)."""
    if lock is not None:
        yield lock
        return
    from ablate.store.lock import experiment_lock

    with experiment_lock(store, experiment, command=f"{__name__} (pid {os.getpid()})", take_over=take_over) as own:
        if own.took_over and hasattr(progress, "note"):
            progress.note(own.took_over)
        yield own


def run_experiment(spec: Spec, store: Store, address: str | None = None, *, progress: Any = None,
                   options: LaunchOptions | None = None, lock: Any = None, take_over: bool = False) -> list[RunResult]:
    """Every (arm, seed) of the spec (sequential specs: seed rounds), resumable. Holds the
    experiment's lock (`lock` if the caller took it, else taken here): LockHeld if another
    driver runs the experiment."""
    progress = progress or NullProgress()
    with held_lock(store, spec.name, lock, take_over, progress) as lock:
        prepare_experiment(spec, store, progress)
        kw = {"progress": progress, "options": options, "lock": lock}
        with ray_session(address):
            if not spec.sequential:
                return run_requests(spec, expand(spec), store, **kw)
            seq = spec.seeds
            results = run_requests(spec, expand(spec, range(seq.min), round=0), store, **kw)  # type: ignore[union-attr]
            for rnd, seed in enumerate(range(seq.min, seq.max), start=1):  # type: ignore[union-attr]
                arms = arms_to_continue_stored(store, spec)
                if not arms:
                    break
                results += run_requests(spec, expand(spec, [seed], arms, round=rnd), store, **kw)
            return results

"""Ray Tune orchestration: one Tune trial per run attempt, torchrun inside it, Parquet from the driver.

    python -m ablate run experiments/smoke.yaml              # through ablate.cli

    from ablate.orchestrate import run_experiment, run_requests
    results = run_experiment(spec, Store("results"))          # every (arm, seed), resumable
    results = run_requests(spec, [make_request(spec, "baseline", 0)], store)   # any list (search)

Each trial (a Ray worker holding the run's bundle: all its GPUs, or CPUs for CPU ranks) writes
the run's overrides to a temporary YAML file, starts `python -m torch.distributed.run
--standalone ... -m trainer.train` through `ablate.launch` (process-tree guard, free rendezvous
port) — or, with `resources.reuse_workers`, hands the run to the long-lived trainer worker its
reused actor keeps (ablate.workers) — reports val/step events to Tune as they arrive, and returns
everything in one final report. The driver's Tune callback writes the run to the store as each
trial ends, so a killed driver loses at most the runs in flight. Tune never retries
(max_failures=0): a failed attempt gets its own row, and the driver launches the next attempt in a
new batch. A run whose loss went non-finite is `diverged` (`divergence`): an outcome of its config
and seed, recorded once and never retried.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import ray
import yaml
from ray import tune

from ablate import __version__
from ablate.errors import AblateError, Interrupted, LaunchError, StoreError
from ablate.launch import run_process, torchrun_command
from ablate.matrix import PlannedRun, RunRequest, expand, plan
from ablate.progress import NullProgress
from ablate.provenance import driver_info, project_root
from ablate.placement import check_cluster, concurrency_limit, run_bundle
from ablate.spec import CACHE_KEY, Spec, data_root_path
from ablate.store import Store

log = logging.getLogger("ablate")

# `error` event types that mean the loss diverged (a status, not a failure to retry)
DIVERGENCE_ERRORS = ("Diverged", "DivergenceError", "NonFiniteLoss")
# Ray's own console output: quiet (the driver shows its own progress). Set before Tune starts.
_RAY_QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@dataclass(frozen=True)
class LaunchOptions:
    """How trials are placed and start the trainer. Tests swap `module` for tests/ablate/fake_trainer.py."""

    module: str = "trainer.train"
    serve_module: str = "trainer.serve"  # the long-lived worker (resources.reuse_workers)
    report_every_s: float = 2.0  # throttle of `step` reports to Tune (val events always go)
    grace_s: float = 10.0  # SIGTERM → SIGKILL delay when a run is stopped
    # The cluster's autoscaler adds nodes (`ablate run --autoscale`): a run no alive node can hold
    # is a warning, not an error, and concurrency is not capped (ablate.placement).
    autoscale: bool = False


@dataclass
class RunResult:
    """The outcome of one request. `row` is the runs row (written now, or found in the store)."""

    request: RunRequest
    status: str  # "ok" | "diverged" | "failed" | "cancelled" | "not-run"
    run_id: str | None = None
    row: dict | None = None
    attempts: int = 0  # attempts launched by this call
    reused: bool = False  # the store already had the outcome; nothing ran

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------------
# Ray session
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Connect to `address` (or $RAY_ADDRESS, e.g. inside `ray job submit`), else start an
    embedded local cluster (`address="local"`: never attaches to a stale `ray start` cluster).
    Reuses an already initialised Ray without shutting it down."""
    if ray.is_initialized():
        yield ray
        return
    for k, v in _RAY_QUIET_ENV.items():
        os.environ.setdefault(k, v)
    addr = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if addr == "local":
        kwargs["include_dashboard"] = False
        # "token auth is enabled by default" (auth stays on; the notice is noise for an embedded cluster)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=addr, **kwargs)
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
# The trial (runs in a Ray worker)
# --------------------------------------------------------------------------------------------
def _trial(job: dict, opts: LaunchOptions) -> None:
    """One run attempt: torchrun → events → Tune reports → final payload report."""
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
    last_step_report = [0.0]

    def on_event(ev: dict) -> None:
        kind = ev["event"]
        if kind == "val":
            tune.report({"step": ev.get("step"), "val_loss": ev.get("val_loss"), "train_time_ms": ev.get("train_time_ms")})
        elif kind == "step" and time.time() - last_step_report[0] >= opts.report_every_s:
            last_step_report[0] = time.time()
            tune.report({"step": ev.get("step"), "train_time_ms": ev.get("train_time_ms"), "step_ms": ev.get("step_ms")})

    payload: dict[str, Any] = {"node_id": None, "node_ip": None, "hostname": socket.gethostname()}
    try:
        payload["node_id"] = ray.get_runtime_context().get_node_id()
        payload["node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 (provenance only)
        pass
    # first report: where the run is, so even an attempt lost with its node records that node
    tune.report({"ablate_node": json.dumps(payload)})
    try:
        if job.get("reuse_workers"):
            from ablate.workers import worker_for

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
        payload.update(
            ok=res.ok, error=res.error_text(), returncode=res.returncode, start=start, end=res.last("end"),
            error_event=res.last("error"),
            curve=[{k: e.get(k) for k in ("step", "val_loss", "train_time_ms")} for e in res.curve],
            steps=[{k: e.get(k) for k in ("step", "step_ms", "train_time_ms")} for e in res.steps],
            started_at=res.started_at, start_event_at=res.start_event_at, ended_at=res.ended_at,
            noise_lines=res.noise_count)
    except LaunchError as e:
        now = time.time()
        payload.update(ok=False, error=str(e), returncode=None, start=None, end=None, curve=[], steps=[],
                       started_at=now, start_event_at=None, ended_at=now)
    finally:
        with contextlib.suppress(FileNotFoundError):  # normally the guard removed it
            os.unlink(cfg_path)
    if not payload.get("start"):
        try:
            from trainer.config import load_config, to_dict

            payload["resolved_config"] = to_dict(load_config(job["preset"], overrides, seed=job["seed"]))
        except Exception as e:  # noqa: BLE001 (best effort for a run that died before `start`)
            payload["resolved_config"] = {"error": str(e)}
    tune.report({"ablate_payload": json.dumps(payload)})


def _make_trainable(jobs: list[dict], opts: LaunchOptions):
    # A fresh function object per batch: tune.with_resources sets an attribute on it.
    def ablate_run(config: dict) -> None:
        _trial(jobs[config["index"]], opts)

    return ablate_run


# --------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------
@dataclass
class _Attempt:
    planned: PlannedRun
    order: int
    job: dict = field(default_factory=dict)
    started_at: float | None = None  # when Tune started the trial (driver clock)
    node: dict = field(default_factory=dict)  # node_id/node_ip/hostname, from the trial's first report
    status: str | None = None  # set when the row is written
    row: dict | None = None

    @property
    def request(self) -> RunRequest:
        return self.planned.request

    @property
    def run_id(self) -> str:
        return self.request.run_id(self.planned.attempt)


def _job(spec: Spec, a: _Attempt, opts: LaunchOptions) -> dict:
    r, req = spec.resources, a.request
    data_dir = spec.resolve(req.arm, req.overrides).data.data_dir
    overrides = dict(req.overrides)
    if r.compile_cache_dir:  # where this node's compile cache lives; not part of the config hash
        overrides[CACHE_KEY] = r.compile_cache_dir
    return {"run_id": a.run_id, "arm": req.arm, "seed": req.seed, "preset": spec.trainer.preset,
            "overrides": overrides, "data_dir": data_dir, "data_root": spec.data_root,
            "ranks": r.ranks, "omp_threads": r.omp_threads, "timeout_s": r.timeout_s,
            "module": opts.module, "serve_module": opts.serve_module, "reuse_workers": r.reuse_workers}


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


def build_row(spec: Spec, a: _Attempt, payload: dict, driver: dict) -> tuple[dict, list[dict], list[dict]]:
    """The runs row (schema v1) and the curve/step rows of one finished attempt."""
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
    config = start.get("config") or payload.get("resolved_config") or {}
    row = {
        "experiment": spec.name, "arm": req.arm, "seed": req.seed, "run_id": a.run_id,
        "attempt": a.planned.attempt, "round": req.round, "order": a.order, "source": req.source,
        "search_trial": req.search_trial, "config_hash": req.config_hash,
        "config_json": json.dumps(config, sort_keys=True), "overrides_json": json.dumps(req.overrides, sort_keys=True),
        "status": status, "error": error,
        "final_val_loss": end.get("final_val_loss"), "train_time_ms": end.get("train_time_ms"),
        "steps": end.get("steps"), "tokens": end.get("tokens"), "peak_mem_mib": end.get("peak_mem_mib"),
        "warmup_s": end.get("warmup_s"), "compile_s": end.get("compile_s"), "eval_s": end.get("eval_s"),
        "world_size": start.get("world_size") or r.ranks,
        "node_id": payload.get("node_id"), "node_ip": payload.get("node_ip"),
        "hostname": env.get("hostname") or payload.get("hostname"),
        "gpu_model": env.get("gpu_name"), "gpu_count": env.get("gpu_count", r.gpus_per_run) or 0,
        "gpu_uuids": ",".join(env.get("gpu_uuids") or []),
        "python_version": env.get("python") or driver.get("python"),
        "torch_version": env.get("torch") or driver.get("torch"),
        "triton_version": env.get("triton"), "cuda_version": env.get("cuda"), "driver": env.get("driver"),
        "git_commit": env.get("git_commit") or driver.get("git_commit"), "ablate_version": __version__,
        "started_at": started, "ended_at": ended,
        "launch_s": (payload["start_event_at"] - started) if payload.get("start_event_at") else None,
        "wall_s": max(0.0, ended - started),
        "worker_runs_before": payload.get("worker_runs_before"),
        "attn_backend": (config.get("model") or {}).get("attn_backend"),
        "data_synthetic": data.get("synthetic"), "data_hash": data.get("hash"),
    }
    keys = {"run_id": a.run_id, "experiment": spec.name, "arm": req.arm, "seed": req.seed}
    curve = [{**keys, **c} for c in payload.get("curve") or []]
    steps = [{**keys, **s} for s in payload.get("steps") or []]
    return row, curve, steps


class _Batch(tune.Callback):
    """Tune callback: progress, in-flight markers and the store write of each finished trial."""

    def __init__(self, spec: Spec, attempts: list[_Attempt], store: Store, progress: Any) -> None:
        self.spec, self.attempts, self.store, self.progress = spec, attempts, store, progress
        self.driver = driver_info()
        self.store_errors: list[str] = []

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into tuner.pkl (for Tuner.restore, which ablate does not use);
        # the store and the live display do not pickle.
        return {}

    def _a(self, trial: Any) -> _Attempt:
        return self.attempts[trial.config["index"]]

    def on_trial_start(self, iteration, trials, trial, **info):
        a = self._a(trial)
        a.started_at = time.time()
        self.progress.started(a.run_id, a.request.arm, a.request.seed)
        try:
            self.store.mark_inflight(self.spec.name, a.run_id, {
                "run_id": a.run_id, "arm": a.request.arm, "seed": a.request.seed, "started_at": time.time(),
                "driver_host": self.driver["hostname"], "driver_pid": os.getpid()})
        except StoreError as e:
            self.store_errors.append(str(e))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        a = self._a(trial)
        if "ablate_node" in result:
            a.node = json.loads(result["ablate_node"])
        elif "ablate_payload" not in result:
            self.progress.update(a.run_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        raw = (trial.last_result or {}).get("ablate_payload")
        payload = json.loads(raw) if raw else {"ok": False, "error": "trial ended without a result (Ray)"}
        self.record(self._a(trial), payload)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.record(self._a(trial), {"ok": False, "error": f"Ray trial failed: {_trial_error(trial)}"[-4000:]})

    def record(self, a: _Attempt, payload: dict) -> None:
        if a.status is not None:
            return
        payload = {**a.node, **payload}  # a trial lost with its node still names the node
        row, curve, steps = build_row(self.spec, a, payload, self.driver)
        try:
            self.store.write_run(row, curve, steps)
        except StoreError as e:
            self.store_errors.append(str(e))
        a.status, a.row = row["status"], row
        left = a.planned.attempts_left - 1 if row["status"] == "failed" else 0
        self.progress.finished(a.run_id, row["status"], row["final_val_loss"], row["wall_s"], retries_left=left)

    def cancel_unfinished(self) -> bool:
        """Rows for trials that started but never finished (driver interrupted); True if any
        attempt of the batch has no outcome."""
        missing = False
        for a in self.attempts:
            if a.status is None and a.started_at is not None:
                self.record(a, {"status": "cancelled", "error": "cancelled: the driver was interrupted",
                                "started_at": a.started_at, "ended_at": time.time()})
            missing |= a.status is None
        return missing


def _trial_error(trial: Any) -> str:
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


def _run_batch(spec: Spec, attempts: list[_Attempt], store: Store, progress: Any, opts: LaunchOptions) -> bool:
    """Run the attempts as one Tune experiment, in order. Returns True if it was interrupted."""
    for a in attempts:
        a.job = _job(spec, a, opts)
    nodes = ray.nodes()
    # ONE bundle per run (all its GPUs on one node; + gpu_node for 8-GPU runs): ablate.placement
    resources = tune.PlacementGroupFactory([run_bundle(spec.resources, nodes)])
    trainable = tune.with_resources(_make_trainable([a.job for a in attempts], opts), resources)
    batch = _Batch(spec, attempts, store, progress)
    storage = tempfile.mkdtemp(prefix="ablate-tune-")
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search(list(range(len(attempts))))},  # in order: seed-major
        # reuse_workers: a trial's actor (and the trainer worker it keeps) serves the next trial
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency_limit(spec, nodes, opts.autoscale),
                                    reuse_actors=spec.resources.reuse_workers),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=0, callbacks=[batch],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    interrupted = False
    try:
        with _quiet_tune():
            tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        interrupted |= batch.cancel_unfinished()
        shutil.rmtree(storage, ignore_errors=True)
    if batch.store_errors:
        raise StoreError("writing results failed:\n" + "\n".join(batch.store_errors[:5]))
    return interrupted


def run_requests(spec: Spec, requests: list[RunRequest], store: Store, address: str | None = None, *,
                 progress: Any = None, options: LaunchOptions | None = None) -> list[RunResult]:
    """Obtain an outcome for each request: reuse `ok` rows in the store, run the rest through
    Tune with retries (spec.retries), write every attempt to the store. Results in request order.

    Raises Interrupted when the driver is stopped (rows written so far stay)."""
    progress = progress or NullProgress()
    opts = options or LaunchOptions()
    unique = list({req.key: req for req in requests}.values())
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
        launched: dict[tuple, int] = {}
        while todo:
            attempts = [_Attempt(p, next_order + i) for i, p in enumerate(todo)]
            next_order += len(attempts)
            interrupted = _run_batch(spec, attempts, store, progress, opts)
            for a in attempts:
                key = a.request.key
                launched[key] = launched.get(key, 0) + (a.started_at is not None)
                results[key] = RunResult(a.request, a.status or "not-run", a.run_id, a.row, launched[key])
            if interrupted:
                raise Interrupted("interrupted: finished runs are in the store; in-flight runs were killed and "
                                  "recorded as cancelled; run the same spec again to resume")
            todo = [PlannedRun(a.request, "todo", a.planned.attempt + 1, a.planned.attempts_left - 1)
                    for a in attempts if a.status == "failed" and a.planned.attempts_left > 1]
    return [results[req.key] for req in requests]


def _arms_to_continue(store: Store, spec: Spec) -> list[str]:
    """Arms that get another seed round: ablate.sequential decides; without it, every arm."""
    try:
        from ablate.sequential import arms_to_continue
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


def run_experiment(spec: Spec, store: Store, address: str | None = None, *, progress: Any = None,
                   options: LaunchOptions | None = None) -> list[RunResult]:
    """Every (arm, seed) of the spec (sequential specs: seed rounds), resumable."""
    progress = progress or NullProgress()
    store.write_bytes(spec.name, "spec.yaml", (spec.text or json.dumps(spec.model_dump())).encode())
    store.clear_inflight(spec.name)  # markers left by a killed driver
    with ray_session(address):
        if not spec.sequential:
            return run_requests(spec, expand(spec), store, progress=progress, options=options)
        seq = spec.seeds
        results = run_requests(spec, expand(spec, range(seq.min), round=0), store,  # type: ignore[union-attr]
                               progress=progress, options=options)
        for rnd, seed in enumerate(range(seq.min, seq.max), start=1):  # type: ignore[union-attr]
            arms = _arms_to_continue(store, spec)
            if not arms:
                break
            results += run_requests(spec, expand(spec, [seed], arms, round=rnd), store,
                                    progress=progress, options=options)
        return results

"""Running a script arm (ablate.spec.script) inside a Ray Tune trial, and what its log becomes.

    ablate run premul-o.yaml        # ablate.run.driver hands script arms to `trial` below

Each run gets a working directory of its own (in the trial's staging directory on its node),
holding the arm's patched script and its `files:`, and runs there under the same launcher as
trainer runs (ablate.run.launch: process-tree guard, torchrun `--standalone`, Ray's placement):

    python -m torch.distributed.run --standalone --nproc_per_node=N train_gpt.py ARGS...

with the arm's `env`, `DATA_PATH` = the working directory, whose `data` is a link to the spec's
`data_root` (default: `<project root>/data`), so a record script's `$DATA_PATH/data/fineweb10B/...`
(and an older script's `data/fineweb10B/...`) is `<data_root>/fineweb10B/...`, the folder the
full-size trainer specs read; `SEED` (the run's seed; record scripts do not read it, so their runs
are replicates), `ABLATE_RUN_ID`, `OMP_NUM_THREADS`, and the compile cache variables when
resources.compile_cache_dir is set. stdout lines in the record format
(`step:N/M val_loss:X train_time:Tms step_avg:Sms`) are progress as they come; when the process
ends, the log file the script wrote (`logs/<id>.txt`, named by its first stdout line, else the
newest there; else its stdout lines) is parsed by ablate.store.importlogs.parse_log, the parser of
`ablate import-logs`, into the run's curve, step times, status and environment: the payload from
which the driver builds the run's ablate.store.record.RunRecord (ablate.run.driver.build_row, as for
trainer runs; source=script, script_sha256) and writes it with the log (without the script, which
the store keeps once per sha256 under scripts/) and the curves.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from ablate.store.importlogs import PEAK_MEM, SEPARATOR, TRAIN_LINE, VAL_LINE, LogFormatError, ParsedLog, parse_log

LOGFILE_LINE = re.compile(r"^(\S*logs/[^/\s]+\.txt)\s*$")  # what a record script prints first
MAX_LOG_BYTES = 8 << 20  # a log kept in the store is cut to this size (a record log is ~0.2 MiB)
SEP_LINE = "=" * 100


def script_command(nproc: int, script: str, args: list[str], python: str = sys.executable) -> list[str]:
    """The command line of a script run: the record's own `torchrun --standalone` invocation."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


# --------------------------------------------------------------------------------------------
# stdout → events (live progress)
# --------------------------------------------------------------------------------------------
class RecordLines:
    """Parser of a record script's stdout for ablate.run.launch.run_process: `val` and `step` events
    (the trainer's names), a `start` event for the log file line, None for anything else. Keeps
    the record-format lines (the log when the script writes no file) and when the first line came."""

    def __init__(self) -> None:
        self.logfile: str | None = None
        self.first_at: float | None = None
        self.record_lines: list[str] = []
        self._prev = (0.0, 0)  # (train_time_ms, step) of the previous train line

    def __call__(self, line: str) -> dict | None:
        text = line.rstrip("\r\n")
        if self.first_at is None and text.strip():
            self.first_at = time.time()
        if m := VAL_LINE.match(text):
            try:
                ev = {"event": "val", "step": int(m[1]), "total": int(m[2]), "val_loss": float(m[3]),
                      "train_time_ms": float(m[4])}
            except ValueError:
                return None
            self.record_lines.append(text)
            return ev
        if m := TRAIN_LINE.match(text):
            step, t = int(m[1]), float(m[3])
            prev_t, prev_step = self._prev
            step_ms = (t - prev_t) / (step - prev_step) if step > prev_step else math.nan
            self._prev = (t, step)
            self.record_lines.append(text)
            return {"event": "step", "step": step, "total": int(m[2]), "train_time_ms": t, "step_ms": step_ms}
        if PEAK_MEM.match(text):
            self.record_lines.append(text)
            return None
        if self.logfile is None and (m := LOGFILE_LINE.match(text)):
            self.logfile = m[1]
            return {"event": "start", "logfile": m[1]}
        return None

    def stdout_log(self) -> bytes:
        """The record lines as a log without a script part (the parser wants the '=' line)."""
        return ("\n".join([SEP_LINE, *self.record_lines]) + "\n").encode()


# --------------------------------------------------------------------------------------------
# The driver side: the job of one run attempt, the code in the store
# --------------------------------------------------------------------------------------------
def job(spec: Any, req: Any, run_id: str) -> dict:
    """Everything a trial needs to run the script arm `req.arm` (texts included: nodes need no files)."""
    from ablate.provenance import git_commit
    from ablate.spec.script import resolved

    sa, r = resolved(spec, req.arm), spec.resources
    config = sa.config()
    config["script"]["git_commit"] = git_commit(str(Path(sa.script.path).parent))
    config["script"]["nproc_per_node"] = r.ranks
    return {"kind": "script", "run_id": run_id, "arm": req.arm, "seed": req.seed, "ranks": r.ranks,
            "omp_threads": r.omp_threads, "timeout_s": r.timeout_s, "data_root": spec.data_root,
            "compile_cache_dir": r.compile_cache_dir, "gpus": r.gpus_per_run,
            "code": [{"name": f.name, "text": f.text, "sha256": f.sha256} for f in (sa.script, *sa.files)],
            "env": dict(sa.env), "args": list(sa.args), "script_sha256": sa.script.sha256, "script_config": config}


def code_path(name: str, sha256: str) -> str:
    """Where the store keeps a code file's text: scripts/<sha256><suffix>, once per content."""
    return f"scripts/{sha256}{PurePosixPath(name).suffix}"


def store_code(store: Any, experiment: str, jobs: list[dict]) -> None:
    """Write each script and file text the jobs run into the store, once per sha256 (driver, before
    the runs start, so every row's script_sha256 has its text)."""
    seen: set[str] = set()
    for j in jobs:
        for f in j.get("code") or []:
            rel = code_path(f["name"], f["sha256"])
            if rel not in seen and store.read_bytes(experiment, rel) is None:
                store.write_bytes(experiment, rel, f["text"].encode())
            seen.add(rel)


def write_log(store: Any, experiment: str, run_id: str, payload: dict) -> None:
    """The run's log as the store keeps it: logs/<run_id>.txt (the script part is under scripts/)."""
    if payload.get("script_log"):
        store.write_bytes(experiment, f"logs/{run_id}.txt", payload["script_log"].encode())


# --------------------------------------------------------------------------------------------
# The trial (in a Ray worker on the run's node)
# --------------------------------------------------------------------------------------------
def trial(job: dict, opts: Any) -> None:
    """One attempt of a script run: working directory → torchrun → live reports → final payload."""
    from ray import tune

    from ablate.errors import LaunchError
    from ablate.run.launch import run_process
    from ablate.run.reporting import event_reporter, report_node
    from ablate.provenance import project_root

    here = os.getcwd() if os.access(os.getcwd(), os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix=f"ablate-{job['run_id']}-", dir=here)
    for f in job["code"]:
        path = Path(workdir, f["name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f["text"], encoding="utf-8")
    data = data_link(workdir, job["data_root"], project_root())
    env = dict(os.environ)  # CUDA_VISIBLE_DEVICES stays as Ray set it
    env.update(OMP_NUM_THREADS=str(job["omp_threads"]), PYTHONUNBUFFERED="1")
    if job.get("compile_cache_dir"):
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(job["compile_cache_dir"], "inductor")
        env["TRITON_CACHE_DIR"] = os.path.join(job["compile_cache_dir"], "triton")
    env.update(job["env"])
    env.update(DATA_PATH=workdir, SEED=str(job["seed"]), ABLATE_RUN_ID=job["run_id"])
    lines = RecordLines()
    on_event = event_reporter(opts.report_every_s)
    payload = report_node()
    try:
        cmd = script_command(job["ranks"], job["code"][0]["name"], job["args"])
        res = run_process(cmd, env=env, cwd=workdir, on_event=on_event, timeout_s=job["timeout_s"],
                          grace_s=opts.grace_s, parse=lines)
        log_name, log_bytes = find_log(workdir, lines.logfile)
        payload.update(outcome(res, lines, log_name, log_bytes, job,
                               gpu_info(env.get("CUDA_VISIBLE_DEVICES") if job["gpus"] else None)))
        if not payload["ok"] and not data.is_dir():  # the likely cause, named
            payload["error"] = (payload["error"] or "") + (f"\nnote: data/ links to {data}, which does not exist on "
                                                            f"{socket.gethostname()} (data_root in the spec)")
    except LaunchError as e:
        now = time.time()
        payload.update(ok=False, error=str(e), returncode=None, start=None, end=None, curve=[], steps=[],
                       started_at=now, start_event_at=None, ended_at=now)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    tune.report({"ablate_payload": json.dumps(payload)})


def data_link(workdir: str, data_root: str | None, project_root: Path) -> Path:
    """Link `<workdir>/data` to the data folder on this node: `data_root` (relative: under the
    project root), default `<project root>/data`. Returns the target."""
    from ablate.spec.model import data_root_path

    target = data_root_path(data_root, project_root) if data_root else project_root / "data"
    link = Path(workdir, "data")
    if not link.exists() and not link.is_symlink():  # the arm's own code never holds data/ (ablate.spec.script)
        link.symlink_to(target, target_is_directory=True)
    return target


def find_log(workdir: str, named: str | None) -> tuple[str | None, bytes | None]:
    """The log file the script wrote: the one its first stdout line named, else the newest
    logs/*.txt in its working directory; (None, None) if there is none."""
    root = Path(workdir).resolve()
    candidates = []
    if named:
        p = (root / named).resolve()
        if p.is_file() and p.is_relative_to(root):
            candidates.append(p)
    if not candidates and (root / "logs").is_dir():
        candidates = sorted((p for p in (root / "logs").glob("*.txt") if p.is_file()),
                            key=lambda p: p.stat().st_mtime, reverse=True)[:1]
    for p in candidates:
        with contextlib.suppress(OSError):
            return str(p.relative_to(root)), p.read_bytes()
    return None, None


def gpu_info(visible: str | None) -> dict[str, Any]:
    """Model, UUIDs and driver of the run's GPUs (CUDA_VISIBLE_DEVICES) from nvidia-smi; {} when
    there are none or nvidia-smi is not there. The record log lists every GPU of the node instead."""
    if not visible:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [[c.strip() for c in ln.split(",")] for ln in out.splitlines() if ln.count(",") >= 3]
    by_key = {k: r for r in rows for k in (r[0], r[1])}
    chosen = [by_key.get(v.strip()) for v in visible.split(",") if v.strip()]
    if not chosen or any(c is None for c in chosen):
        return {}
    return {"gpu_uuids": [c[1] for c in chosen], "gpu_name": chosen[0][2], "driver": chosen[0][3]}


# --------------------------------------------------------------------------------------------
# The outcome: LaunchResult + log → the payload ablate.run.driver.build_row reads
# --------------------------------------------------------------------------------------------
def _parse(data: bytes | None, what: str) -> tuple[ParsedLog | None, str | None]:
    if data is None:
        return None, None
    try:
        return parse_log(data), None
    except LogFormatError as e:
        return None, f"{what}: {e}"


def outcome(res: Any, lines: RecordLines, log_name: str | None, log_bytes: bytes | None, job: dict,
            gpus: dict[str, Any] | None = None) -> dict[str, Any]:
    """The payload of a finished script run: ok, error, start/end (as the trainer's events would
    say), curve, steps, times, the log to store. `res` is the ablate.run.launch.LaunchResult."""
    from ablate.run.launch import without_torchrun_report

    parsed, problem = _parse(log_bytes, f"the log file {log_name}")
    source = log_name
    if parsed is None and lines.record_lines:  # no file (or not a record log): what stdout said
        parsed, stdout_problem = _parse(lines.stdout_log(), "stdout")
        source = "stdout" if parsed is not None else source
        problem = problem or stdout_problem
    stopped = getattr(res, "stopped", None)
    ok = res.returncode == 0 and stopped is None and parsed is not None and parsed.status == "ok"
    parts: list[str] = []
    if not ok:
        if stopped:
            parts.append(f"stopped: {stopped}")
        if res.returncode not in (0, None):
            parts.append(f"exit code {res.returncode}")
        if parsed is None:
            parts.append(problem or "the script printed no `step:N/M val_loss:X train_time:Tms step_avg:Sms` "
                         "lines and wrote no logs/*.txt: not a record-format script (docs/spec.md, Scripts)")
        elif parsed.status == "failed":
            ended = "the script exited 0 but its " if res.returncode == 0 and not stopped else "its "
            rest = (parsed.error or "log is incomplete").removeprefix("log ")
            parts.append(ended + ("log " if source != "stdout" else "stdout ") + rest)
        tail = without_torchrun_report(list(res.stderr_tail))
        if tail:
            parts.append("stderr (last lines):\n" + "\n".join(tail[-20:]))
    gpus = gpus or {}
    env = {"python": (parsed.python_version if parsed else None) or platform.python_version(),
           "torch": parsed.torch_version if parsed else None, "triton": parsed.triton_version if parsed else None,
           "cuda": parsed.cuda_version if parsed else None,
           "driver": gpus.get("driver") or (parsed.driver if parsed else None),
           "gpu_name": gpus.get("gpu_name") or (parsed.gpu_names[0] if parsed and parsed.gpu_names else None),
           "gpu_count": job["gpus"], "gpu_uuids": gpus.get("gpu_uuids") or [], "hostname": socket.gethostname()}
    config = json.loads(json.dumps(job["script_config"]))
    if parsed is not None:
        config["log"] = {"source": source, "total_steps": parsed.total_steps, "last_step": parsed.last_step,
                         "log_sha256": parsed.log_sha256 if source != "stdout" else None}
    end = None
    if ok:
        end = {"final_val_loss": parsed.final_val_loss, "train_time_ms": parsed.train_time_ms,  # type: ignore[union-attr]
               "steps": parsed.last_step, "peak_mem_mib": parsed.peak_mem_mib}  # type: ignore[union-attr]
    live_curve = [e for e in res.events if e.get("event") == "val"]
    live_steps = [e for e in res.events if e.get("event") == "step"]
    curve = parsed.curve if parsed is not None else live_curve
    steps = parsed.steps if parsed is not None else live_steps
    status = None
    if parsed is not None and parsed.status == "diverged":  # an outcome (never retried), in the log's words
        status, parts = "diverged", [parsed.error or "diverged"] + parts
    return {
        "ok": ok, "status": status, "error": "\n".join(parts) if parts else None, "returncode": res.returncode,
        "start": {"config": config, "world_size": job["ranks"], "env": env}, "end": end, "error_event": None,
        "curve": [{k: c.get(k) for k in ("step", "val_loss", "train_time_ms")} for c in curve],
        "steps": [{k: s.get(k) for k in ("step", "step_ms", "train_time_ms")} for s in steps],
        "started_at": res.started_at, "start_event_at": lines.first_at, "ended_at": res.ended_at,
        "noise_lines": getattr(res, "noise_count", 0), "script_log": _log_to_keep(log_bytes),
    }


def _log_to_keep(data: bytes | None) -> str | None:
    """The log from its first '=' line on (the script part is stored once, under scripts/)."""
    if not data:
        return None
    text = data.decode("utf-8", "replace")
    lines = text.splitlines(keepends=True)
    sep = next((i for i, ln in enumerate(lines) if SEPARATOR.match(ln)), 0)
    kept = "".join(lines[sep:])
    if len(kept.encode()) > MAX_LOG_BYTES:
        kept = kept.encode()[:MAX_LOG_BYTES].decode("utf-8", "ignore") + "\n[cut by ablate at 8 MiB]\n"
    return kept

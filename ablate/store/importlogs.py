"""Import speedrun-style text logs (modded-nanogpt record logs) into the store as runs.

    ablate import-logs records/*.txt --experiment upstream-1211 --arm record [--store URI]

A log is: the training script's source, a line of `=` characters, environment lines
(`Running Python ...`, `Running PyTorch <v> compiled for CUDA <c>`, `Running Triton version ...`),
the nvidia-smi block (date, driver, GPU names), another `=` line, then
`step:N/M val_loss:X train_time:Tms step_avg:Sms` and `step:N/M train_time:Tms step_avg:Sms`
lines, and optionally `peak memory allocated: P MiB ...`.

Each log becomes one run (source="import"): status "ok" when its last line reached N == M with a
val_loss, "diverged" when any val_loss is non-finite (nan/inf, as `ablate run` records it),
"failed" with a reason otherwise. run_id = `<arm>-import-<first 16 hex of the log's
sha256>`, so importing the same file again is a no-op; the seed is a stable index: the next
free integer of the arm, in the order the paths were given. A file that is not such a log is
reported with a clear error and skipped; the rest are still imported. Only regular files of at
most MAX_LOG_BYTES are read (a record log is well under 1 MiB; `/dev/zero` or a FIFO is refused).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ablate import __version__
from ablate.errors import LogFormatError
from ablate.store.record import RunRecord

SEPARATOR = re.compile(r"^={20,}\s*$")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) train_time:([0-9.]+)ms step_avg:([0-9.]+)ms\s*$")
TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_time:([0-9.]+)ms step_avg:([0-9.]+)ms\s*$")
PYTHON_LINE = re.compile(r"^Running Python (\S+)")
TORCH_LINE = re.compile(r"^Running PyTorch (\S+)(?: compiled for CUDA (\S+))?")
TRITON_LINE = re.compile(r"^Running Triton version (\S+)")
DRIVER = re.compile(r"Driver Version:\s*(\S+)")
SMI_CUDA = re.compile(r"CUDA Version:\s*(\S+)")
GPU_ROW = re.compile(r"^\|\s+(\d+)\s+(.+?)\s{2,}(?:On|Off)\s+\|")
DATE_LINE = re.compile(r"^((?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) \w{3}\s+\d{1,2} \d\d:\d\d:\d\d \d{4})\s*$")
PEAK_MEM = re.compile(r"^peak memory allocated: (\d+) MiB")
LOG_SUFFIXES = (".txt", ".log")
MAX_LOG_BYTES = 64 * 1024 * 1024


@dataclass
class ParsedLog:
    """What one log says: environment, the val curve, the per-step times and the outcome."""

    source_sha256: str
    log_sha256: str
    total_steps: int
    last_step: int
    curve: list[dict] = field(default_factory=list)      # step, val_loss, train_time_ms
    steps: list[dict] = field(default_factory=list)      # step, step_ms, train_time_ms
    final_val_loss: float | None = None
    train_time_ms: float | None = None
    status: str = "failed"
    error: str | None = None
    python_version: str | None = None
    torch_version: str | None = None
    triton_version: str | None = None
    cuda_version: str | None = None
    driver: str | None = None
    gpu_names: list[str] = field(default_factory=list)
    started_at: datetime | None = None
    peak_mem_mib: float | None = None


def _num(text: str, what: str, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise LogFormatError(f"line {lineno}: {what}={text!r} is not a number") from None


def parse_log(data: bytes) -> ParsedLog:
    """Parse one log's bytes; LogFormatError (naming the line) if it is not a speedrun log."""
    if b"\x00" in data[:65536]:
        raise LogFormatError("binary file (NUL bytes): not a text log")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LogFormatError(f"not UTF-8 text (byte {e.start}): not a speedrun log") from None
    lines = text.splitlines()
    sep = next((i for i, ln in enumerate(lines) if SEPARATOR.match(ln)), None)
    if sep is None:
        raise LogFormatError("no line of '=' characters: expected the training script's source, a line of "
                             "'=' characters, then the log (modded-nanogpt format)")
    source = "\n".join(lines[:sep])
    log = ParsedLog(source_sha256=hashlib.sha256(source.encode()).hexdigest(),
                    log_sha256=hashlib.sha256(data).hexdigest(), total_steps=0, last_step=-1)
    prev_time, prev_step, last_line = 0.0, 0, None
    for i, ln in enumerate(lines[sep + 1:], start=sep + 2):
        if m := VAL_LINE.match(ln):
            n, total = int(m[1]), int(m[2])
            loss, t = _num(m[3], "val_loss", i), _num(m[4], "train_time", i)
            _check_total(log, total, i)
            log.curve.append({"step": n, "val_loss": loss, "train_time_ms": t})
            last_line = ("val", n, loss, t)
        elif m := TRAIN_LINE.match(ln):
            n, total = int(m[1]), int(m[2])
            t = _num(m[3], "train_time", i)
            _check_total(log, total, i)
            step_ms = (t - prev_time) / (n - prev_step) if n > prev_step else math.nan
            log.steps.append({"step": n, "step_ms": step_ms, "train_time_ms": t})
            prev_time, prev_step = t, n
            last_line = ("train", n, None, t)
        elif m := PYTHON_LINE.match(ln):
            log.python_version = m[1]
        elif m := TORCH_LINE.match(ln):
            log.torch_version, log.cuda_version = m[1], m[2] or log.cuda_version
        elif m := TRITON_LINE.match(ln):
            log.triton_version = m[1]
        elif m := GPU_ROW.match(ln):
            log.gpu_names.append(m[2].strip())
        elif m := DATE_LINE.match(ln):
            try:
                log.started_at = datetime.strptime(" ".join(m[1].split()), "%a %b %d %H:%M:%S %Y").replace(
                    tzinfo=timezone.utc)
            except ValueError:
                pass
        elif m := PEAK_MEM.match(ln):
            log.peak_mem_mib = float(m[1])
        else:
            if log.driver is None and (m := DRIVER.search(ln)):
                log.driver = m[1]
            if log.cuda_version is None and (m := SMI_CUDA.search(ln)):
                log.cuda_version = m[1]
    if last_line is None:
        raise LogFormatError("no `step:N/M ... train_time:Tms step_avg:Sms` lines after the '=' line: "
                             "not a speedrun training log")
    kind, n, loss, t = last_line
    log.last_step, log.train_time_ms = n, t
    bad = [c for c in log.curve if not math.isfinite(c["val_loss"])]
    if bad:  # as ablate.run.driver.divergence: a non-finite loss at any eval
        more = f" (and {len(bad) - 1} later eval(s))" if len(bad) > 1 else ""
        log.status = "diverged"
        log.error = f"diverged: val_loss is {bad[0]['val_loss']} at step {bad[0]['step']}/{log.total_steps}{more}"
    elif kind == "val" and n == log.total_steps:
        log.status, log.final_val_loss = "ok", loss
    else:
        log.error = (f"log ends at step {n}/{log.total_steps} without a final val_loss line "
                     "(truncated, crashed or killed)")
    return log


def _check_total(log: ParsedLog, total: int, lineno: int) -> None:
    if log.total_steps == 0:
        log.total_steps = total
    elif total != log.total_steps:
        raise LogFormatError(f"line {lineno}: step total {total} differs from {log.total_steps} on earlier "
                             "lines: two runs in one file? split it into one log per run")


def run_row(log: ParsedLog, *, experiment: str, arm: str, seed: int, order: int, path: str,
            mtime: float | None = None) -> RunRecord:
    """The store's `runs` record for a parsed log (columns a log does not tell stay null)."""
    started = log.started_at or datetime.fromtimestamp(mtime or 0.0, tz=timezone.utc)
    train_s = (log.train_time_ms or 0.0) / 1000.0
    gpu = log.gpu_names[0] if log.gpu_names else None
    return RunRecord(
        experiment=experiment, arm=arm, seed=seed, run_id=import_run_id(arm, log.log_sha256),
        attempt=0, round=0, order=order, source="import", search_trial=None,
        config_hash=log.source_sha256[:12],
        config_json=json.dumps({"import": {"path": path, "log_sha256": log.log_sha256,
                                           "source_sha256": log.source_sha256,
                                           "total_steps": log.total_steps}}, sort_keys=True),
        overrides_json="{}", status=log.status, error=log.error,
        final_val_loss=log.final_val_loss, train_time_ms=log.train_time_ms,
        steps=log.last_step, peak_mem_mib=log.peak_mem_mib,
        world_size=max(len(log.gpu_names), 1),
        gpu_model=gpu, gpu_count=len(log.gpu_names), gpu_uuids="",
        python_version=log.python_version, torch_version=log.torch_version,
        triton_version=log.triton_version, cuda_version=log.cuda_version, driver=log.driver,
        ablate_version=__version__,
        started_at=started, ended_at=started + timedelta(seconds=train_s),
        wall_s=math.nan,  # the log does not record wall-clock time
    )


def import_run_id(arm: str, log_sha256: str) -> str:
    return f"{arm}-import-{log_sha256[:16]}"


@dataclass
class FileResult:
    path: str
    run_id: str | None = None
    seed: int | None = None
    status: str | None = None        # the run's status ("ok"/"diverged"/"failed"), None if not imported
    note: str = ""                   # "imported", "already in the store", or the error
    error: bool = False              # True when the file could not be imported


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; a directory contributes its *.txt / *.log files (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOG_SUFFIXES)
        else:
            out.append(p)
    return out


def read_log(path: Path, max_bytes: int = MAX_LOG_BYTES) -> bytes:
    """A log file's bytes: regular files only, at most `max_bytes` (LogFormatError otherwise)."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LogFormatError("not a regular file (a device, FIFO or socket): not a speedrun log")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise LogFormatError(f"larger than {max_bytes // (1024 * 1024)} MiB: not a speedrun log (a record log is "
                             "well under 1 MiB)")
    return data


def import_logs(store: Any, paths: list[str | Path], experiment: str, arm: str) -> list[FileResult]:
    """Parse and store every log; one FileResult per file (errors included, never raised)."""
    existing = store.runs(experiment, columns=["run_id", "arm", "seed", "order"])
    arm_rows = existing[existing["arm"] == arm] if len(existing) else existing
    known_ids = set(existing["run_id"]) if len(existing) else set()
    next_seed = int(arm_rows["seed"].max()) + 1 if len(arm_rows) else 0
    next_order = int(existing["order"].max()) + 1 if len(existing) else 0
    results: list[FileResult] = []
    for path in expand_paths(paths):
        res = FileResult(str(path))
        results.append(res)
        try:
            data = read_log(path)
        except OSError as e:
            res.note, res.error = f"cannot read: {e.strerror or e}", True
            continue
        except LogFormatError as e:
            res.note, res.error = str(e), True
            continue
        try:
            log = parse_log(data)
        except LogFormatError as e:
            res.note, res.error = str(e), True
            continue
        res.run_id, res.status = import_run_id(arm, log.log_sha256), log.status
        if res.run_id in known_ids:
            res.note = "already in the store (same content): skipped"
            continue
        row = run_row(log, experiment=experiment, arm=arm, seed=next_seed, order=next_order, path=str(path),
                      mtime=path.stat().st_mtime)
        store.write_run(row, log.curve, log.steps)
        known_ids.add(res.run_id)
        res.seed = next_seed
        res.note = "imported" + (f" as {log.status}: {log.error}" if log.error else "")
        next_seed += 1
        next_order += 1
    return results

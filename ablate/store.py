"""Parquet result store: one folder per experiment, one file per run attempt, atomic writes.

    from ablate.store import Store
    store = Store("results")              # or "s3://bucket/prefix", "memory://x", any fsspec URI
    store.runs("smoke")                   # pandas DataFrame, one row per run attempt

Layout (schema version 1, documented in docs/store.md):

    <root>/<experiment>/spec.yaml
    <root>/<experiment>/runs/<run_id>.parquet     one row
    <root>/<experiment>/curves/<run_id>.parquet   val loss per evaluated step
    <root>/<experiment>/steps/<run_id>.parquet    step time per logged step
    <root>/<experiment>/inflight/<run_id>.json    a run the driver has launched and not yet written
    <root>/<experiment>/lock.json                 the driver that runs the experiment (ablate.lock)

A run is visible once its `runs` file exists: it is written last, so readers never see a run
whose curve is missing. Local writes go to a hidden temporary file that is renamed into place;
object stores get one PUT of the finished object. Either way a killed writer leaves no torn file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ablate.errors import StoreError
from ablate.names import check_experiment, check_relpath, is_experiment

SCHEMA_VERSION = 1
DATASETS = ("runs", "curves", "steps")
_TS = pa.timestamp("us", tz="UTC")


def _f(name: str, typ: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


RUNS_SCHEMA = pa.schema([
    _f("schema_version", pa.int32(), False),
    _f("experiment", pa.string(), False),
    _f("arm", pa.string(), False),
    _f("seed", pa.int64(), False),
    _f("run_id", pa.string(), False),
    _f("attempt", pa.int32(), False),
    _f("round", pa.int32(), False),
    _f("order", pa.int64(), False),
    _f("source", pa.string(), False),
    _f("search_trial", pa.int64()),
    _f("config_hash", pa.string(), False),
    _f("config_json", pa.string(), False),
    _f("overrides_json", pa.string(), False),
    _f("status", pa.string(), False),
    _f("error", pa.string()),
    _f("final_val_loss", pa.float64()),
    _f("train_time_ms", pa.float64()),
    _f("steps", pa.int64()),
    _f("tokens", pa.int64()),
    _f("peak_mem_mib", pa.float64()),
    _f("warmup_s", pa.float64()),
    _f("compile_s", pa.float64()),
    _f("eval_s", pa.float64()),  # added in v1 (nullable; older files read as null)
    _f("world_size", pa.int32(), False),
    _f("node_id", pa.string()),
    _f("node_ip", pa.string()),
    _f("hostname", pa.string()),
    _f("gpu_model", pa.string()),
    _f("gpu_count", pa.int32(), False),
    _f("gpu_uuids", pa.string(), False),
    _f("python_version", pa.string()),
    _f("torch_version", pa.string()),
    _f("triton_version", pa.string()),
    _f("cuda_version", pa.string()),
    _f("driver", pa.string()),
    _f("git_commit", pa.string()),
    _f("ablate_version", pa.string(), False),
    _f("started_at", _TS, False),
    _f("ended_at", _TS, False),
    _f("launch_s", pa.float64()),
    _f("wall_s", pa.float64(), False),
    _f("worker_runs_before", pa.int64()),
    _f("attn_backend", pa.string()),  # the trainer's resolved model.attn_backend (fa4 / flex / sdpa)
    _f("data_synthetic", pa.bool_()),  # added in v1: the trainer's `start.data.synthetic` (null: unknown)
    _f("data_hash", pa.string()),  # added in v1: `start.data.hash` of the shards that ran (null: unknown)
    _f("script_sha256", pa.string()),  # script runs (source=script): the script that ran, after patches
])
_KEYS = [_f("run_id", pa.string(), False), _f("experiment", pa.string(), False),
         _f("arm", pa.string(), False), _f("seed", pa.int64(), False)]
CURVES_SCHEMA = pa.schema(_KEYS + [_f("step", pa.int64(), False), _f("val_loss", pa.float64()),
                                   _f("train_time_ms", pa.float64())])
STEPS_SCHEMA = pa.schema(_KEYS + [_f("step", pa.int64(), False), _f("step_ms", pa.float64()),
                                  _f("train_time_ms", pa.float64())])
SCHEMAS = {"runs": RUNS_SCHEMA, "curves": CURVES_SCHEMA, "steps": STEPS_SCHEMA}
RUN_STATUSES = ("ok", "failed", "cancelled", "diverged")  # docs/store.md, "runs columns"


def _with_meta(schema: pa.Schema, dataset: str) -> pa.Schema:
    return schema.with_metadata({"ablate.dataset": dataset, "ablate.schema_version": str(SCHEMA_VERSION)})


def _timestamp(v: Any) -> datetime:
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)
    if isinstance(v, (int, float)):
        return datetime.fromtimestamp(float(v), tz=timezone.utc)
    return datetime.fromisoformat(str(v))


class Store:
    """Parquet store under a local path or any pyarrow/fsspec URI (see module docstring)."""

    def __init__(self, uri: str = "results") -> None:
        self.uri = str(uri)
        self.fs, self.root, self.local = _filesystem(self.uri)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # ---- paths -----------------------------------------------------------------------------
    def _path(self, experiment: str, *parts: str) -> str:
        """A path under the experiment's folder. The name and the parts are checked, so no
        argument can point outside the store (`ablate report ../x`): SpecError (exit 2)."""
        check_experiment(experiment)
        for part in parts:
            check_relpath(part)
        return "/".join([self.root.rstrip("/"), experiment, *parts]) if self.root else "/".join([experiment, *parts])

    def display_path(self, experiment: str, relpath: str = "") -> str:
        """Where a file lives, as a user would type it (local path or URI)."""
        base = self.uri.split("?", 1)[0].rstrip("/") if "://" in self.uri else self.root
        return "/".join(p for p in (base, experiment, relpath) if p)

    # ---- writing ---------------------------------------------------------------------------
    def _put(self, path: str, data: bytes) -> None:
        """Atomic write: temp file + rename locally; a single PUT of the finished object elsewhere."""
        parent = path.rsplit("/", 1)[0]
        try:
            self.fs.create_dir(parent, recursive=True)
            if self.local:
                tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    with self.fs.open_output_stream(tmp) as out:
                        out.write(data)
                    self.fs.move(tmp, path)
                except BaseException:
                    _quiet_delete(self.fs, tmp)
                    raise
            else:
                with self.fs.open_output_stream(path) as out:
                    out.write(data)
        except OSError as e:
            raise StoreError(f"cannot write {path!r} in store {self.uri!r}: {_cause(e)}; fix: check the store URI, "
                             "free space and permissions/credentials (--store)") from None

    def _table_bytes(self, table: pa.Table) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    def write_run(self, run: dict, curve: list[dict], steps: list[dict]) -> None:
        """Write one run attempt: curves and steps first, the `runs` row last (the commit point)."""
        row = {**run, "schema_version": SCHEMA_VERSION}
        missing = [f.name for f in RUNS_SCHEMA if not f.nullable and row.get(f.name) is None]
        if missing:
            raise StoreError(f"run row {row.get('run_id')!r} lacks required columns: {', '.join(missing)}")
        unknown = sorted(set(row) - set(RUNS_SCHEMA.names))
        if unknown:
            raise StoreError(f"run row {row.get('run_id')!r} has columns not in schema v{SCHEMA_VERSION}: "
                             f"{', '.join(unknown)}; fix: drop them or add them to the schema (docs/store.md)")
        if row["status"] not in RUN_STATUSES:
            raise StoreError(f"status={row['status']!r} is invalid: one of {', '.join(RUN_STATUSES)}")
        for k in ("started_at", "ended_at"):
            row[k] = _timestamp(row[k])
        exp, run_id = row["experiment"], row["run_id"]
        keys = {k: row[k] for k in ("run_id", "experiment", "arm", "seed")}
        files = []  # every file is built before the first is written: a bad value writes nothing
        for dataset, items, cols in (("curves", curve, ("step", "val_loss", "train_time_ms")),
                                     ("steps", steps, ("step", "step_ms", "train_time_ms")),
                                     ("runs", None, None)):
            rows = [{f.name: row.get(f.name) for f in RUNS_SCHEMA}] if items is None else \
                [{**keys, **{c: it.get(c) for c in cols}} for it in items]
            try:
                table = pa.Table.from_pylist(rows, schema=_with_meta(SCHEMAS[dataset], dataset))
            except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
                raise StoreError(f"run {run_id!r}: a value does not fit the {dataset} schema v{SCHEMA_VERSION} "
                                 f"({type(e).__name__}: {e}); nothing of this run was written") from None
            files.append((self._path(exp, dataset, f"{run_id}.parquet"), self._table_bytes(table)))
        for path, data in files:  # curves and steps first, the runs row last (the commit point)
            self._put(path, data)
        self.clear_inflight(exp, run_id)

    def write_bytes(self, experiment: str, relpath: str, data: bytes) -> str:
        """Write a report file (or the spec copy) under the experiment; returns its path/URI."""
        self._put(self._path(experiment, *relpath.split("/")), data)
        return self.display_path(experiment, relpath)

    def create_exclusive(self, experiment: str, relpath: str, data: bytes) -> bool | None:
        """Create a file only if it does not exist, atomically, complete from the first moment:
        True if created, False if it existed; None where the filesystem cannot do this (object
        stores: a PUT always wins; ablate.lock then verifies by reading back)."""
        path = self._path(experiment, *relpath.split("/"))
        if not isinstance(self.fs, pafs.LocalFileSystem):
            return None
        parent = os.path.dirname(path)
        tmp = f"{parent}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # fails with EEXIST if the file exists: never replaces one
            except FileExistsError:
                return False
            return True
        except OSError as e:
            raise StoreError(f"cannot write {path!r} in store {self.uri!r}: {_cause(e)}; fix: check free space "
                             "and permissions (--store)") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def delete(self, experiment: str, relpath: str) -> None:
        """Delete one file under the experiment (absent: nothing to do); StoreError if it fails."""
        path = self._path(experiment, *relpath.split("/"))
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if _exists(self.fs, path) is False:
                return
            raise StoreError(f"cannot delete {path!r} in store {self.uri!r}: {_cause(e)}") from None

    def remove_runs(self, experiment: str, run_ids: list[str]) -> None:
        """Delete run attempts: each one's `runs` file first (it disappears from every table at
        once), then its curves and steps, a script run's log and any in-flight marker."""
        for run_id in run_ids:
            for dataset in ("runs", "curves", "steps"):
                self.delete(experiment, f"{dataset}/{run_id}.parquet")
            self.delete(experiment, f"logs/{run_id}.txt")  # script runs (ablate.script_run)
            self.delete(experiment, f"inflight/{run_id}.json")

    def remove_experiment(self, experiment: str) -> None:
        """Delete the experiment's folder with everything in it (runs, spec copy, reports, study)."""
        path = self._path(experiment)
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if _exists(self.fs, path) is not False:
                raise StoreError(f"cannot delete {path!r} in store {self.uri!r}: {_cause(e)}") from None

    def clean_temporary(self, experiment: str) -> int:
        """Delete the hidden temporary files a killed writer left in the experiment's run folders
        (local stores; object stores have none). Call it only while holding the experiment lock:
        then no other writer of these folders exists. Returns how many were removed."""
        if not self.local:
            return 0
        removed = 0
        for dataset in (*DATASETS, "inflight"):
            sel = pafs.FileSelector(self._path(experiment, dataset), allow_not_found=True)
            try:
                infos = self.fs.get_file_info(sel)
            except OSError:
                continue
            for i in infos:
                if i.type == pafs.FileType.File and i.base_name.startswith(".") and i.base_name.endswith(".tmp"):
                    _quiet_delete(self.fs, i.path)
                    removed += 1
        return removed

    def read_bytes(self, experiment: str, relpath: str, max_bytes: int | None = None) -> bytes | None:
        """A file under the experiment, or None if it does not exist. With `max_bytes`, a larger
        file is a StoreError (nothing reads an unbounded file into memory by accident)."""
        path = self._path(experiment, *relpath.split("/"))
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            if _exists(self.fs, path) is False:
                return None
            raise StoreError(f"cannot read {path!r} in store {self.uri!r}: {_cause(e)}") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise StoreError(f"{path!r} in store {self.uri!r} is larger than {max_bytes} bytes: not a file ablate "
                             "wrote; fix: move it aside")
        return data

    # ---- in-flight markers (for `ablate status`) -------------------------------------------
    def mark_inflight(self, experiment: str, run_id: str, info: dict) -> None:
        self._put(self._path(experiment, "inflight", f"{run_id}.json"), json.dumps(info).encode())

    def clear_inflight(self, experiment: str, run_id: str | None = None) -> None:
        """Remove one marker, or every marker of the experiment (run_id None)."""
        names = [f"{run_id}.json"] if run_id else [p.rsplit("/", 1)[1] for p in
                                                   self._list(experiment, "inflight", ".json")]
        for name in names:
            _quiet_delete(self.fs, self._path(experiment, "inflight", name))

    def inflight(self, experiment: str) -> list[dict]:
        out = []
        for path in self._list(experiment, "inflight", ".json"):
            try:
                with self.fs.open_input_stream(path) as f:
                    out.append(json.loads(f.read()))
            except (OSError, ValueError):
                continue
        return out

    # ---- reading ---------------------------------------------------------------------------
    def _list(self, experiment: str, dataset: str, suffix: str = ".parquet") -> list[str]:
        sel = pafs.FileSelector(self._path(experiment, dataset), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except OSError as e:
            raise StoreError(f"cannot list {sel.base_dir!r} in store {self.uri!r}: {_cause(e)}") from None
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and i.base_name.endswith(suffix) and not i.base_name.startswith((".", "_")))

    def _read(self, experiment: str, dataset: str) -> pa.Table:
        schema = SCHEMAS[dataset]
        tables = []
        for path in self._list(experiment, dataset):
            try:
                t = pq.read_table(path, filesystem=self.fs)
            except (OSError, pa.ArrowInvalid) as e:
                raise StoreError(f"cannot read {path!r}: {_cause(e)}; fix: move the damaged file aside") from None
            tables.append(_conform(t, schema, path))
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def runs(self, experiment: str):
        """One row per run attempt, in launch order (`order`, then `attempt`)."""
        df = self._read(experiment, "runs").to_pandas()
        return df.sort_values(["order", "attempt", "run_id"], kind="stable").reset_index(drop=True)

    def _per_step(self, experiment: str, dataset: str, runs=None):
        df = self._read(experiment, dataset).to_pandas()
        if len(df):  # rows of written runs only; `runs`: the caller's runs frame (not read again)
            visible = set(runs["run_id"]) if runs is not None else \
                set(self._read(experiment, "runs").column("run_id").to_pylist())
            df = df[df["run_id"].isin(visible)]
        return df.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)

    def curves(self, experiment: str, runs=None):
        """Val loss per evaluated step of every written run (`runs`: the runs frame already read)."""
        return self._per_step(experiment, "curves", runs)

    def steps(self, experiment: str, runs=None):
        """Step time per logged step of every written run (`runs`: the runs frame already read)."""
        return self._per_step(experiment, "steps", runs)

    def experiments(self) -> list[str]:
        sel = pafs.FileSelector(self.root or "/", allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except OSError as e:
            raise StoreError(f"cannot list store {self.uri!r}: {_cause(e)}") from None
        out = []
        for i in infos:
            if i.type == pafs.FileType.Directory and is_experiment(i.base_name):
                sub = self.fs.get_file_info([self._path(i.base_name, "runs"), self._path(i.base_name, "spec.yaml")])
                if any(s.type != pafs.FileType.NotFound for s in sub):
                    out.append(i.base_name)
        return sorted(out)


def _conform(table: pa.Table, schema: pa.Schema, path: str) -> pa.Table:
    """Cast a file's table to the current schema: missing nullable columns become null."""
    meta = table.schema.metadata or {}
    version = int(meta.get(b"ablate.schema_version", b"1"))
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path!r} has schema version {version}, newer than this ablate ({SCHEMA_VERSION}); "
                         "fix: upgrade ablate")
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            raise StoreError(f"{path!r} lacks required column {f.name!r} (schema v{version}); fix: move the "
                             "file aside or migrate it (docs/store.md)")
    return pa.Table.from_arrays(cols, schema=schema)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path inside it, is_local) for a path or URI."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), True
    arrow_uri = uri
    if uri.startswith("s3://") and "allow_delayed_open" not in uri:
        # one PutObject of the finished object at close (small files), not a multipart upload
        arrow_uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
    scheme = uri.split("://", 1)[0].lower()
    arrow_error: Exception | None = None
    try:
        fs, root = pafs.FileSystem.from_uri(arrow_uri)
        if isinstance(fs, pafs.S3FileSystem):
            _check_bucket(fs, root, uri)
        return fs, root.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        arrow_error = e
    if scheme in _ARROW_SCHEMES and not isinstance(arrow_error, pa.ArrowNotImplementedError):
        # pyarrow knows this scheme and said what is wrong (a bad query parameter, an unknown
        # bucket, ...): that is the cause, not fsspec's "install s3fs"
        raise StoreError(f"store URI {uri!r} is not usable: {_cause(arrow_error)}; fix: check the URI "
                         "(s3://bucket/prefix?region=...&endpoint_override=host:port), the bucket and the "
                         "credentials") from None
    try:
        import fsspec

        ffs, root = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError, OSError) as e:
        first = f"pyarrow: {_cause(arrow_error)}; fsspec: " if arrow_error is not None else ""
        raise StoreError(f"store URI {uri!r} is not usable: {first}{_cause(e)}; fix: use a local path, "
                         "s3://bucket/prefix, or another fsspec URI whose package is installed") from None
    local = "file" in (ffs.protocol if isinstance(ffs.protocol, tuple) else (ffs.protocol,))
    return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), root.rstrip("/"), local


# Schemes whose pyarrow error is the answer (ablate's documented S3 path); for other schemes
# fsspec is tried next and both causes are reported if it fails too.
_ARROW_SCHEMES = ("s3",)


def _check_bucket(fs: pafs.FileSystem, root: str, uri: str) -> None:
    """A missing S3 bucket lists as empty: say so instead of showing an empty store."""
    bucket = root.split("/", 1)[0]
    if not bucket:
        raise StoreError(f"store URI {uri!r} names no bucket; fix: s3://bucket/prefix")
    try:
        info = fs.get_file_info(bucket)
    except OSError:
        return  # e.g. no HeadBucket permission with a prefix-only policy: the first real access says why
    if info.type == pafs.FileType.NotFound:
        raise StoreError(f"store URI {uri!r}: bucket {bucket!r} does not exist (or these credentials cannot see "
                         "it); fix: create it or correct the name")


def _cause(e: BaseException | None) -> str:
    """An exception's own text, with its chained causes (S3 errors keep the AWS error text)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip() or type(e).__name__
        if not any(text in p for p in parts):
            parts.append(text)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def _exists(fs: pafs.FileSystem, path: str) -> bool | None:
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError:
        return None


def _quiet_delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass

"""Parquet result store: one folder per experiment, one file per run attempt, atomic writes.

    from ablate.store.parquet import Store
    store = Store("results")              # or "s3://bucket/prefix", "memory://x", any fsspec URI
    store.runs("smoke")                   # pandas DataFrame, one row per run attempt
    store.write_run(record, curve, steps) # an ablate.store.record.RunRecord and its curve/step rows

Layout (schema version 1, documented in docs/store.md):

    <root>/<experiment>/spec.yaml
    <root>/<experiment>/runs/<run_id>.parquet     one row
    <root>/<experiment>/curves/<run_id>.parquet   val loss per evaluated step
    <root>/<experiment>/steps/<run_id>.parquet    step time per logged step
    <root>/<experiment>/inflight/<run_id>.json    a run the driver has launched and not yet written
    <root>/<experiment>/lock.json                 the driver that runs the experiment (ablate.store.lock)

A run is visible once its `runs` file exists: it is written last, so readers never see a run
whose curve is missing. Local writes go to a hidden temporary file that is renamed into place;
object stores get one PUT of the finished object. Either way a killed writer leaves no torn file.
The rows and their schemas are ablate.store.record's; each read is one pyarrow.dataset scan of a folder.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ablate.errors import StoreError
from ablate.names import check_experiment, check_relpath, is_experiment
from ablate.store.record import (CURVES_SCHEMA, DATASETS, RUN_STATUSES, RUNS_SCHEMA, SCHEMA_VERSION, SCHEMAS, STEPS_SCHEMA,
                           CurvePoint, RunRecord, StepTime, from_table, to_table)

# The schemas come from the record types (ablate.store.record); these names stay importable from here.
__all__ = ["CURVES_SCHEMA", "DATASETS", "RUNS_SCHEMA", "RUN_STATUSES", "SCHEMAS", "SCHEMA_VERSION", "STEPS_SCHEMA",
           "Store"]


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

    def write_run(self, run: RunRecord | Mapping[str, Any], curve: Iterable[Mapping[str, Any]],
                  steps: Iterable[Mapping[str, Any]]) -> None:
        """Write one run attempt: curves and steps first, the `runs` row last (the commit point).

        `run` is a RunRecord (a mapping of its columns is made one: RunRecord.from_row); `curve`
        and `steps` are CurvePoint/StepTime rows or mappings with their value columns (`step`,
        `val_loss`/`step_ms`, `train_time_ms`); their keys are the run's. Every file is built
        before the first is written: a value that does not fit writes nothing."""
        record = RunRecord.from_row(run)
        if record.schema_version != SCHEMA_VERSION:
            record = replace(record, schema_version=SCHEMA_VERSION)
        exp, run_id = record.experiment, record.run_id
        files = []
        rows = {"curves": [CurvePoint.for_run(record, c) for c in curve],
                "steps": [StepTime.for_run(record, s) for s in steps], "runs": [record]}
        for dataset in ("curves", "steps", "runs"):  # curves and steps first, the runs row last
            try:
                table = to_table(dataset, rows[dataset])
            except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
                raise StoreError(f"run {run_id!r}: a value does not fit the {dataset} schema v{SCHEMA_VERSION} "
                                 f"({type(e).__name__}: {e}); nothing of this run was written") from None
            files.append((self._path(exp, dataset, f"{run_id}.parquet"), self._table_bytes(table)))
        for path, data in files:
            self._put(path, data)
        self.clear_inflight(exp, run_id)

    def write_bytes(self, experiment: str, relpath: str, data: bytes) -> str:
        """Write a report file (or the spec copy) under the experiment; returns its path/URI."""
        self._put(self._path(experiment, *relpath.split("/")), data)
        return self.display_path(experiment, relpath)

    def create_exclusive(self, experiment: str, relpath: str, data: bytes) -> bool | None:
        """Create a file only if it does not exist, atomically, complete from the first moment:
        True if created, False if it existed; None where the filesystem cannot do this (object
        stores: a PUT always wins; ablate.store.lock then verifies by reading back)."""
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
            self.delete(experiment, f"logs/{run_id}.txt")  # script runs (ablate.run.script_trial)
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

    def _list(self, experiment: str, folder: str, suffix: str) -> list[str]:
        """The files `*<suffix>` in a folder of the experiment (in-flight markers), sorted."""
        sel = pafs.FileSelector(self._path(experiment, folder), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except OSError as e:
            raise StoreError(f"cannot list {sel.base_dir!r} in store {self.uri!r}: {_cause(e)}") from None
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and i.base_name.endswith(suffix) and not i.base_name.startswith((".", "_")))

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
    def _dataset(self, experiment: str, dataset: str, run_ids: set[str] | None = None) -> ds.FileSystemDataset:
        """The dataset's files in the experiment's folder, with the dataset's schema (this lists the
        folder; it reads no file). Names starting with `.` or `_` (a writer's temporary files) and
        other than *.parquet are left out; with `run_ids`, the files of those runs only."""
        folder = self._path(experiment, dataset)
        selector = pafs.FileSelector(folder, allow_not_found=True)
        options = ds.FileSystemFactoryOptions(selector_ignore_prefixes=[".", "_"])
        try:
            found = ds.FileSystemDatasetFactory(self.fs, selector, ds.ParquetFileFormat(), options).finish(
                SCHEMAS[dataset])
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot list {folder!r} in store {self.uri!r}: {_cause(e)}") from None
        keep = [f for f in found.get_fragments() if f.path.endswith(".parquet")
                and (run_ids is None or _run_id_of(f.path) in run_ids)]
        if len(keep) == len(found.files):
            return found
        return ds.FileSystemDataset(keep, SCHEMAS[dataset], ds.ParquetFileFormat(), self.fs)

    def read(self, experiment: str, dataset: str, columns: list[str] | None = None,
             where: ds.Expression | None = None, run_ids: set[str] | None = None) -> pa.Table:
        """One scan of a dataset ("runs", "curves", "steps") of the experiment, with its schema
        (ablate.store.record): every file read once, cast to the current schema (a nullable column an
        older file lacks reads as null), in no particular row order. `columns`: only these;
        `where`: a pyarrow.dataset filter, e.g. `ds.field("arm") == "lr"`; `run_ids`: only these
        runs' files. StoreError naming the file for a file newer than this ablate, one lacking a
        required column, or one that cannot be read."""
        schema = SCHEMAS[dataset]
        cols = list(schema.names if columns is None else columns)
        unknown = [c for c in cols if c not in schema.names]
        if unknown:
            raise ValueError(f"columns {unknown} are not in the {dataset} schema: {', '.join(schema.names)}")
        data = self._dataset(experiment, dataset, run_ids)
        batches, files = [], {}
        try:
            for tagged in data.scanner(columns=cols, filter=where).scan_batches():
                batches.append(tagged.record_batch)
                files[tagged.fragment.path] = tagged.fragment.physical_schema  # read with the file, not again
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot read {dataset} of {experiment!r} in store {self.uri!r}: {_cause(e)}; fix: "
                             "move the damaged file aside") from None
        for path, physical in files.items():
            _check_file(physical, schema, path)
        return pa.Table.from_batches(batches, schema=pa.schema([schema.field(c) for c in cols]))

    def runs(self, experiment: str, columns: list[str] | None = None, where: ds.Expression | None = None):
        """One row per run attempt, in launch order (`order`, then `attempt`): a pandas DataFrame
        of the runs schema (ablate.store.record.RunRecord). `columns`/`where`: as for `read`."""
        keys = ["order", "attempt", "run_id"]
        wanted = list(RUNS_SCHEMA.names) if columns is None else list(columns)
        df = self.read(experiment, "runs", wanted + [k for k in keys if k not in wanted], where).to_pandas()
        df = df.sort_values(keys, kind="stable").reset_index(drop=True)
        return df if columns is None else df[wanted]

    def run_records(self, experiment: str, where: ds.Expression | None = None) -> list[RunRecord]:
        """The runs as RunRecords, in launch order."""
        table = self.read(experiment, "runs", where=where)
        return from_table("runs", table.sort_by([("order", "ascending"), ("attempt", "ascending"),
                                                 ("run_id", "ascending")]))

    def _per_step(self, experiment: str, dataset: str, runs=None):
        """Rows of the runs whose `runs` file exists (the commit point): only their files are read.
        `runs`: the caller's runs frame, already read (its run ids are used, nothing is listed again)."""
        visible = set(runs["run_id"]) if runs is not None else \
            {_run_id_of(path) for path in self._dataset(experiment, "runs").files}
        df = self.read(experiment, dataset, run_ids=visible).to_pandas()
        return df.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)

    def curves(self, experiment: str, runs=None):
        """Val loss per evaluated step of every written run (ablate.store.record.CurvePoint columns);
        `runs`: the runs frame already read."""
        return self._per_step(experiment, "curves", runs)

    def steps(self, experiment: str, runs=None):
        """Step time per logged step of every written run (ablate.store.record.StepTime columns);
        `runs`: the runs frame already read."""
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


def _run_id_of(path: str) -> str:
    """The run a file belongs to: every dataset names its file `<run_id>.parquet`."""
    return path.rsplit("/", 1)[-1].removesuffix(".parquet")


def _check_file(physical: pa.Schema, schema: pa.Schema, path: str) -> None:
    """A file the current schema can read: not of a newer version, no required column missing."""
    version = int((physical.metadata or {}).get(b"ablate.schema_version", b"1"))
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path!r} has schema version {version}, newer than this ablate ({SCHEMA_VERSION}); "
                         "fix: upgrade ablate")
    missing = [f.name for f in schema if not f.nullable and f.name not in physical.names]
    if missing:
        raise StoreError(f"{path!r} lacks required column {missing[0]!r} (schema v{version}); fix: move the "
                         "file aside or migrate it (docs/store.md)")


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

"""The store's rows, typed: RunRecord (one `runs` row per run attempt), CurvePoint and StepTime (the
`curves` and `steps` rows), and the Parquet schemas derived from them (schema version 1).

    from ablate.store.record import RunRecord, RUNS_SCHEMA
    record = RunRecord(experiment="smoke", arm="baseline", seed=0, run_id="baseline-s0-6b2b38ef85fe-a1", ...)
    store.write_run(record, curve, steps)          # ablate.store.parquet; store.run_records("smoke") reads them back

Every row the store writes is one of these: ablate.run.driver.build_row (trainer runs, runs of a
long-lived worker and script runs, from the trial's payload) and ablate.store.importlogs.run_row
(imported logs) return a RunRecord; ablate.store.parquet writes records and reads them back with the
schemas below.

The schemas come from the type hints: `str` string, `int` int64, `Int32` int32, `float` float64,
`bool` bool, `datetime` timestamp[us, UTC]; `X | None` is a nullable column (default None), a bare
type a required one. The field order is the column order. Adding a column is one field here plus
the line that sets it where its value comes from (build_row, run_row), and its row in docs/store.md;
files written before it read as null in that column, so add it nullable (a required column or a
changed type is a new SCHEMA_VERSION: docs/store.md, "Versioning").

A record reads like the row it is: `record["status"]`, `record.get("error")`, `dict(record)`.
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from functools import cache
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import pyarrow as pa

from ablate.errors import StoreError

SCHEMA_VERSION = 1
DATASETS = ("runs", "curves", "steps")
RUN_STATUSES = ("ok", "failed", "cancelled", "diverged")  # docs/store.md, "runs columns"

Int32 = Annotated[int, pa.int32()]
_ARROW_TYPES: dict[Any, pa.DataType] = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                                        datetime: pa.timestamp("us", tz="UTC")}


def arrow_field(name: str, hint: Any) -> pa.Field:
    """The Arrow field of one record field: nullable when the hint is `X | None`."""
    nullable = False
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        nullable = len(args) < len(get_args(hint))
        if len(args) != 1:
            raise TypeError(f"field {name!r}: type {hint!r} is not one Arrow type (or it | None)")
        hint = args[0]
    if get_origin(hint) is Annotated:
        typ = next((m for m in hint.__metadata__ if isinstance(m, pa.DataType)), None)
    else:
        typ = _ARROW_TYPES.get(hint)
    if typ is None:
        raise TypeError(f"field {name!r}: no Arrow type for {hint!r}; use one of str, int, Int32, float, bool, "
                        "datetime (or Annotated[T, pa.<type>()])")
    return pa.field(name, typ, nullable=nullable)


class Record(Mapping[str, Any]):
    """Base of the store's row types (frozen, keyword-only dataclasses): the schema comes from the
    fields, and a record is a read-only mapping of column → value in schema order."""

    __slots__ = ()
    DATASET = ""  # "runs" | "curves" | "steps"

    @classmethod
    def schema(cls) -> pa.Schema:
        """The Arrow schema of this row type (no metadata: file_schema adds it)."""
        return _schema(cls)

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return _columns(cls)

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return _required(cls)

    def __post_init__(self) -> None:
        missing = [n for n in self.required() if getattr(self, n) is None]
        if missing:
            raise StoreError(f"{self.DATASET} row {getattr(self, 'run_id', None)!r} lacks required columns: "
                             f"{', '.join(missing)}")

    # ---- the mapping view ----------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self.columns():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns())

    def __len__(self) -> int:
        return len(self.columns())

    def as_row(self) -> dict[str, Any]:
        """column → value, in schema order (what Arrow writes)."""
        return {n: getattr(self, n) for n in self.columns()}


@cache
def _schema(cls: type) -> pa.Schema:
    hints = get_type_hints(cls, include_extras=True)
    return pa.schema([arrow_field(f.name, hints[f.name]) for f in dataclasses.fields(cls)])


@cache
def _columns(cls: type) -> tuple[str, ...]:
    return tuple(_schema(cls).names)


@cache
def _required(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in _schema(cls) if not f.nullable)


def _timestamp(v: Any) -> datetime:
    """A UTC datetime from a datetime (naive = UTC), epoch seconds or ISO text."""
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)
    if isinstance(v, (int, float)):
        return datetime.fromtimestamp(float(v), tz=timezone.utc)
    return datetime.fromisoformat(str(v))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunRecord(Record):
    """One `runs` row: one run attempt's identity, config, outcome, results and provenance.
    docs/store.md ("runs columns") says where each value comes from."""

    DATASET = "runs"

    schema_version: Int32 = SCHEMA_VERSION
    experiment: str  # spec `name` (the folder)
    arm: str
    seed: int
    run_id: str  # <arm>-s<seed>-<config_hash>-a<attempt> (imports: <arm>-import-<log sha256[:16]>)
    attempt: Int32  # 1, 2, ... per identity (imports: 0)
    round: Int32  # seed round of a sequential spec, 0-based
    order: int  # launch order within the experiment
    source: str  # ablate | script | search | import
    search_trial: int | None = None  # Optuna trial number (source=search)
    config_hash: str
    config_json: str  # the resolved config that ran, JSON
    overrides_json: str  # the arm's flat dotted overrides, JSON
    status: str  # one of RUN_STATUSES
    error: str | None = None
    final_val_loss: float | None = None  # from here to eval_s: the trainer's `end` event
    train_time_ms: float | None = None
    steps: int | None = None
    tokens: int | None = None
    peak_mem_mib: float | None = None
    warmup_s: float | None = None
    compile_s: float | None = None
    eval_s: float | None = None  # added in v1 (older files read as null)
    world_size: Int32
    node_id: str | None = None  # Ray node of the trial
    node_ip: str | None = None
    hostname: str | None = None
    gpu_model: str | None = None
    gpu_count: Int32
    gpu_uuids: str  # comma-joined, "" on CPU
    python_version: str | None = None
    torch_version: str | None = None
    triton_version: str | None = None
    cuda_version: str | None = None
    driver: str | None = None
    git_commit: str | None = None
    ablate_version: str
    started_at: datetime  # epoch seconds and ISO text are converted (UTC)
    ended_at: datetime
    launch_s: float | None = None  # process start → `start` event
    wall_s: float  # ended_at − started_at (imports: NaN, unknown)
    worker_runs_before: int | None = None  # resources.reuse_workers: runs the worker served before
    attn_backend: str | None = None  # the trainer's resolved model.attn_backend (fa4 / flex / sdpa)
    data_synthetic: bool | None = None  # added in v1: the trainer's `start.data.synthetic` (null: unknown)
    data_hash: str | None = None  # added in v1: `start.data.hash` of the shards that ran (null: unknown)
    script_sha256: str | None = None  # script runs (source=script): the script that ran, after patches

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status not in RUN_STATUSES:
            raise StoreError(f"status={self.status!r} is invalid: one of {', '.join(RUN_STATUSES)}")
        for k in ("started_at", "ended_at"):
            object.__setattr__(self, k, _timestamp(getattr(self, k)))

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunRecord:
        """A record from a column → value mapping (a test's dict, a row read back): StoreError
        naming the columns that are unknown or missing."""
        if isinstance(row, RunRecord):
            return row
        missing = [n for n in cls.required() if row.get(n) is None and n != "schema_version"]
        if missing:
            raise StoreError(f"run row {row.get('run_id')!r} lacks required columns: {', '.join(missing)}")
        unknown = sorted(set(row) - set(cls.columns()))
        if unknown:
            raise StoreError(f"run row {row.get('run_id')!r} has columns not in schema v{SCHEMA_VERSION}: "
                             f"{', '.join(unknown)}; fix: drop them or add a field to ablate.store.record.RunRecord "
                             "(docs/store.md)")
        return cls(**row)

    @property
    def run_keys(self) -> dict[str, Any]:
        """The keys every curves/steps row of this run starts with."""
        return {k: getattr(self, k) for k in RunKeys.columns()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunKeys(Record):
    """The columns a curves or steps row starts with: the run it belongs to."""

    run_id: str
    experiment: str
    arm: str
    seed: int

    @classmethod
    def for_run(cls, run: RunRecord, point: Mapping[str, Any]):
        """The row of `point` (step, ... as the trainer's event has them) for `run`: its keys come
        from the run, so a row can never name another run."""
        own = [n for n in cls.columns() if n not in RunKeys.columns()]
        return cls(**run.run_keys, **{n: point.get(n) for n in own})


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurvePoint(RunKeys):
    """One `curves` row: the val loss at one evaluated step (a trainer `val` event)."""

    DATASET = "curves"

    step: int
    val_loss: float | None = None  # null: the loss was not finite (the trainer writes NaN as null)
    train_time_ms: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTime(RunKeys):
    """One `steps` row: the time of one logged step (a trainer `step` event)."""

    DATASET = "steps"

    step: int
    step_ms: float | None = None
    train_time_ms: float | None = None


RECORDS: dict[str, type[Record]] = {"runs": RunRecord, "curves": CurvePoint, "steps": StepTime}
RUNS_SCHEMA = RunRecord.schema()
CURVES_SCHEMA = CurvePoint.schema()
STEPS_SCHEMA = StepTime.schema()
SCHEMAS = {name: cls.schema() for name, cls in RECORDS.items()}


def file_schema(dataset: str) -> pa.Schema:
    """The schema a file of `dataset` is written with: the columns and the metadata
    `ablate.dataset` and `ablate.schema_version` (docs/store.md, "Versioning")."""
    return SCHEMAS[dataset].with_metadata({"ablate.dataset": dataset, "ablate.schema_version": str(SCHEMA_VERSION)})


def to_table(dataset: str, records: Iterable[Record]) -> pa.Table:
    """Records of one dataset as an Arrow table with the file schema (ArrowException, TypeError,
    ValueError or OverflowError when a value does not fit its column)."""
    return pa.Table.from_pylist([r.as_row() for r in records], schema=file_schema(dataset))


def from_table(dataset: str, table: pa.Table) -> list[Any]:
    """The records of an Arrow table read with the dataset's schema."""
    cls = RECORDS[dataset]
    return [cls(**row) for row in table.select(list(cls.columns())).to_pylist()]

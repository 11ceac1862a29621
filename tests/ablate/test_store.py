"""Parquet store: round trip (local, fsspec memory://, S3 via moto), frozen v1 fixture, atomic writes.

    python -m pytest tests/ablate/test_store.py -q
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ablate.errors import StoreError
from ablate.store.record import RECORDS, SCHEMAS, CurvePoint, RunRecord, file_schema
from ablate.store.parquet import CURVES_SCHEMA, RUNS_SCHEMA, SCHEMA_VERSION, STEPS_SCHEMA, Store

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1"
ROOT = Path(__file__).resolve().parents[2]


def make_run(arm: str = "baseline", seed: int = 0, attempt: int = 1, status: str = "ok", order: int = 0,
             loss: float | None = 3.5, experiment: str = "exp") -> dict:
    return {
        "experiment": experiment, "arm": arm, "seed": seed, "run_id": f"{arm}-s{seed}-abcdefabcdef-a{attempt}",
        "attempt": attempt, "round": 0, "order": order, "source": "ablate", "search_trial": None,
        "config_hash": "abcdefabcdef", "config_json": "{}", "overrides_json": "{}", "status": status,
        "error": None if status == "ok" else "boom", "final_val_loss": loss, "train_time_ms": 1000.0,
        "steps": 10, "tokens": 100, "peak_mem_mib": 1.0, "warmup_s": 0.0, "compile_s": 0.0, "world_size": 2,
        "node_id": "n", "node_ip": "127.0.0.1", "hostname": "h", "gpu_model": None, "gpu_count": 0,
        "gpu_uuids": "", "python_version": "3.11", "torch_version": "2.13.0", "triton_version": None,
        "cuda_version": None, "driver": None, "git_commit": None, "ablate_version": "0.1.0",
        "started_at": 1_800_000_000.0 + order, "ended_at": 1_800_000_010.0 + order, "launch_s": 3.0, "wall_s": 10.0,
    }


CURVE = [{"step": 0, "val_loss": 6.0, "train_time_ms": 0.0}, {"step": 10, "val_loss": 3.5, "train_time_ms": 1000.0}]
STEPS = [{"step": k, "step_ms": 100.0, "train_time_ms": 100.0 * k} for k in range(1, 11)]


def _round_trip(store: Store) -> None:
    assert store.experiments() == []
    empty = store.runs("exp")
    assert list(empty.columns) == RUNS_SCHEMA.names and len(empty) == 0
    assert list(store.curves("exp").columns) == CURVES_SCHEMA.names
    assert list(store.steps("exp").columns) == STEPS_SCHEMA.names
    store.write_run(make_run("lr", 0, order=1, loss=3.4), CURVE, STEPS)
    store.write_run(make_run("baseline", 0, order=0), CURVE, STEPS)
    store.write_run(make_run("baseline", 1, order=2, status="failed", loss=None), [], STEPS[:3])
    runs = store.runs("exp")
    assert list(runs["run_id"]) == ["baseline-s0-abcdefabcdef-a1", "lr-s0-abcdefabcdef-a1",
                                    "baseline-s1-abcdefabcdef-a1"]  # launch order
    assert list(runs["status"]) == ["ok", "ok", "failed"]
    assert runs["final_val_loss"].iloc[1] == 3.4 and pd.isna(runs["final_val_loss"].iloc[2])
    assert (runs["schema_version"] == SCHEMA_VERSION).all()
    assert str(runs["started_at"].dtype) == "datetime64[us, UTC]"
    assert runs["started_at"].iloc[0] == pd.Timestamp(1_800_000_000.0, unit="s", tz="UTC")
    curves = store.curves("exp")
    assert len(curves) == 4 and set(curves["arm"]) == {"baseline", "lr"}
    assert curves[curves["run_id"] == "lr-s0-abcdefabcdef-a1"]["val_loss"].tolist() == [6.0, 3.5]
    assert len(store.steps("exp")) == 23
    assert store.experiments() == ["exp"]
    where = store.write_bytes("exp", "report.md", b"# hi")
    assert where.endswith("exp/report.md")
    assert store.read_bytes("exp", "report.md") == b"# hi"
    assert store.read_bytes("exp", "nothing.md") is None


def test_round_trip_local(store: Store) -> None:
    _round_trip(store)


def test_round_trip_fsspec_memory() -> None:
    _round_trip(Store(f"memory://ablate-test-{os.getpid()}-{time.time_ns()}"))


def test_round_trip_s3_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        _, port = srv.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        uri = f"s3://bucket/prefix?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir("bucket")  # moto starts empty
        store = Store(uri)
        _round_trip(store)
        assert store.display_path("exp", "report.md") == "s3://bucket/prefix/exp/report.md"
        store.mark_inflight("exp", "lr-s1-x-a1", {"run_id": "lr-s1-x-a1"})  # markers: PUT, list, DELETE
        assert [m["run_id"] for m in store.inflight("exp")] == ["lr-s1-x-a1"]
        store.clear_inflight("exp")
        assert store.inflight("exp") == []
        # what the bucket holds: exactly the finished objects, no temporary or partial ones
        infos = store.fs.get_file_info(pafs.FileSelector("bucket/prefix", recursive=True))
        keys = sorted(i.path.removeprefix("bucket/prefix/") for i in infos if i.type == pafs.FileType.File)
        ids = ["baseline-s0-abcdefabcdef-a1", "baseline-s1-abcdefabcdef-a1", "lr-s0-abcdefabcdef-a1"]
        assert keys == sorted([f"exp/{d}/{i}.parquet" for d in ("curves", "runs", "steps") for i in ids]
                              + ["exp/report.md"])
        for key in keys:  # each object is a whole Parquet file of its dataset
            if key.endswith(".parquet"):
                meta = pq.read_table(f"bucket/prefix/{key}", filesystem=store.fs).schema.metadata
                assert meta[b"ablate.dataset"].decode() == key.split("/")[1], key
        assert Store(uri).runs("exp")["run_id"].tolist() == store.runs("exp")["run_id"].tolist()
        # the experiment lock over S3 (PUT, settle, read back), and a missing bucket named as such
        from ablate.errors import LockHeld
        from ablate.store.lock import acquire

        lock = acquire(store, "exp", settle_s=0.05)
        with pytest.raises(LockHeld, match="locked by another driver"):
            acquire(Store(uri), "exp", settle_s=0.05)
        lock.release()
        assert store.read_bytes("exp", "lock.json") is None
        with pytest.raises(StoreError, match="bucket 'nobucket' does not exist"):
            Store(uri.replace("s3://bucket/", "s3://nobucket/"))
    finally:
        srv.stop()


def test_frozen_v1_fixture_reads() -> None:
    """Files written by schema v1 (committed, never regenerated) stay readable, values intact."""
    store = Store(str(FIXTURE))
    assert store.experiments() == ["fixture"]
    runs = store.runs("fixture")
    assert list(runs.columns) == RUNS_SCHEMA.names
    assert list(runs["run_id"]) == ["baseline-s0-aaaaaaaaaaaa-a1", "lr-0.03-s0-bbbbbbbbbbbb-a1",
                                    "lr-0.03-s1-bbbbbbbbbbbb-a1"]
    assert list(runs["status"]) == ["ok", "ok", "failed"]
    assert runs["final_val_loss"].iloc[0] == pytest.approx(3.2791)
    assert runs["error"].iloc[2].startswith("RuntimeError: debug.fail_at_step=3")
    assert runs["gpu_uuids"].iloc[0].split(",")[-1] == "GPU-7"
    assert runs["started_at"].iloc[1] == pd.Timestamp("2026-11-22 12:03:20", tz="UTC")
    curves = store.curves("fixture")
    assert curves["step"].tolist() == [0, 250, 2160, 0, 250, 2160]
    assert curves["val_loss"].iloc[2] == pytest.approx(10.8 - 2160 / 400)
    assert len(store.steps("fixture")) == 9
    assert store.read_bytes("fixture", "spec.yaml") == b"name: fixture\n"


PATHS = Path(__file__).parent / "fixtures" / "store_v1_paths"  # written at edd618f, before RunRecord
PATHS_GOLDEN = Path(__file__).parent / "golden" / "store_v1_paths"


@pytest.mark.parametrize("experiment", ["paths", "premul-o"])
def test_store_written_before_runrecord_reads_the_same(experiment: str) -> None:
    """A store written by the run paths before RunRecord (ok, failed-then-retried, diverged, an
    imported log; script runs) reads as it did then: the same frames, the same `ablate table`."""
    from ablate.cli.results import render_table
    from ablate.analysis.tables import read_experiment

    store = Store(str(PATHS))
    assert store.experiments() == ["paths", "premul-o"]
    for what in ("runs", "curves", "steps"):
        got = getattr(store, what)(experiment).to_csv(index=False)
        assert got == (PATHS_GOLDEN / f"{experiment}-{what}.csv").read_text(), what
    for fmt in ("md", "csv"):
        assert render_table(read_experiment(store, experiment), fmt) == (PATHS_GOLDEN / f"{experiment}.{fmt}").read_text(), fmt
    records = store.run_records(experiment)
    assert all(isinstance(r, RunRecord) for r in records)
    assert [r.run_id for r in records] == store.runs(experiment)["run_id"].tolist()
    statuses = {"paths": ["ok", "ok", "ok", "failed", "ok", "ok", "diverged", "ok"], "premul-o": ["ok"] * 4}
    assert [r.status for r in records] == statuses[experiment]
    sources = {"paths": ["ablate"] * 7 + ["import"], "premul-o": ["script"] * 4}
    assert [r.source for r in records] == sources[experiment]


def test_todays_run_paths_write_the_files_they_wrote_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_row → RunRecord and import-logs → RunRecord write the same Parquet files (columns,
    types, values, schema metadata) as the hand-built rows did (the frozen store_v1_paths)."""
    from tests.ablate.fixtures import make_store_v1_paths as make

    monkeypatch.chdir(ROOT)  # the imported log's path is recorded as given (relative)
    store = Store(str(tmp_path))
    make.write_trainer_runs(store)
    make.write_imported_log(store)
    old_files = sorted((PATHS / "paths").glob("*/*.parquet"))
    assert len(old_files) == 24
    assert sorted(tmp_path.glob("paths/*/*.parquet")) == [tmp_path / p.relative_to(PATHS) for p in old_files]
    for old in old_files:
        new = pq.read_table(tmp_path / old.relative_to(PATHS))
        before = pq.read_table(old)
        assert new.schema.equals(before.schema, check_metadata=True), old.name
        if "ablate_version" in new.column_names:  # the package version that wrote it
            new, before = new.drop(["ablate_version"]), before.drop(["ablate_version"])
        assert new.to_pandas().equals(before.to_pandas()), old.name  # (NaN == NaN here, unlike Arrow's)
    assert pq.read_schema(old_files[0]).equals(file_schema(old_files[0].parent.name), check_metadata=True)


def test_schema_is_derived_from_the_records() -> None:
    """The Parquet schemas are the record dataclasses' fields: names and order, types, nullability."""
    for dataset, cls in RECORDS.items():
        assert SCHEMAS[dataset].names == [f.name for f in dataclasses.fields(cls)], dataset
        # nullable exactly when the field may be None (and then it defaults to None)
        assert [f.nullable for f in SCHEMAS[dataset]] == [f.default is None for f in dataclasses.fields(cls)]
    assert RUNS_SCHEMA is RunRecord.schema() and len(RUNS_SCHEMA) == 46
    assert RUNS_SCHEMA.field("attempt").type == pa.int32() and RUNS_SCHEMA.field("order").type == pa.int64()
    assert RUNS_SCHEMA.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert RUNS_SCHEMA.field("data_synthetic").type == pa.bool_() and RUNS_SCHEMA.field("data_synthetic").nullable
    assert not RUNS_SCHEMA.field("gpu_uuids").nullable
    assert CURVES_SCHEMA.names[:4] == STEPS_SCHEMA.names[:4] == ["run_id", "experiment", "arm", "seed"]

    # a new column is one field: the schema, the file and the read-back record follow
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WithColour(RunRecord):
        colour: str | None = None

    assert WithColour.schema().names == RUNS_SCHEMA.names + ["colour"]
    assert WithColour.schema().field("colour") == pa.field("colour", pa.string(), nullable=True)
    rec = WithColour(**make_run(), colour="red")
    assert rec["colour"] == "red" and dict(rec)["colour"] == "red" and list(rec)[-1] == "colour"


def test_docs_list_every_runs_column_in_order() -> None:
    """docs/store.md's `runs` table names the columns of ablate.store.record.RunRecord, in schema order."""
    text = (ROOT / "docs" / "store.md").read_text()
    table = text.split("## `runs` columns", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert [c.strip() for cell in cells for c in cell.split(",")] == RUNS_SCHEMA.names


def test_run_records_round_trip_and_bad_records(store: Store) -> None:
    record = RunRecord.from_row(make_run(loss=3.25))
    assert record.started_at == datetime(2027, 1, 15, 8, 0, tzinfo=timezone.utc)  # epoch seconds → UTC
    store.write_run(record, [CurvePoint.for_run(record, c) for c in CURVE], STEPS)
    assert store.run_records("exp") == [record]
    assert store.curves("exp").to_dict("records")[1] == {**record.run_keys, **CURVE[1]}
    with pytest.raises(StoreError, match="status='weird' is invalid"):
        RunRecord.from_row({**make_run(), "status": "weird"})
    with pytest.raises(StoreError, match="curves row 'r' lacks required columns: step"):
        CurvePoint(run_id="r", experiment="exp", arm="a", seed=0, step=None)


class _CountingFS(pafs.FSSpecHandler):
    """The local filesystem, counting the files opened for reading."""

    def __init__(self) -> None:
        import fsspec

        super().__init__(fsspec.filesystem("file"))
        self.opened: list[str] = []

    def open_input_file(self, path):
        self.opened.append(path.rsplit("/", 2)[-2])  # the dataset folder
        return super().open_input_file(path)


def test_each_read_is_one_scan_with_projection_and_filter(store: Store) -> None:
    """runs/curves/steps read each file of their dataset once (curves/steps open no runs file: the
    runs files' names say which runs are written); `columns` and `where` narrow the read."""
    import pyarrow.dataset as ds

    for i, arm in enumerate(["baseline", "lr", "baseline"]):
        store.write_run(make_run(arm, seed=i, order=i), CURVE, STEPS)
    counting = _CountingFS()
    store.fs = pafs.PyFileSystem(counting)
    assert len(store.runs("exp")) == 3 and counting.opened == ["runs"] * 3
    counting.opened.clear()
    assert len(store.curves("exp")) == 6 and counting.opened == ["curves"] * 3
    counting.opened.clear()
    got = store.runs("exp", columns=["run_id", "seed"], where=ds.field("arm") == "baseline")
    assert list(got.columns) == ["run_id", "seed"] and got["seed"].tolist() == [0, 2]
    assert counting.opened == ["runs"] * 3
    with pytest.raises(ValueError, match="not in the runs schema"):
        store.runs("exp", columns=["colour"])


def test_old_file_missing_nullable_column_and_newer_version(store: Store) -> None:
    store.write_run(make_run(), CURVE, STEPS)
    path = Path(store.root) / "exp" / "runs" / "baseline-s0-abcdefabcdef-a1.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop(["launch_s"]), path)  # as if written before launch_s existed
    assert pd.isna(store.runs("exp")["launch_s"].iloc[0])
    newer = table.replace_schema_metadata({b"ablate.schema_version": str(SCHEMA_VERSION + 1).encode()})
    pq.write_table(newer, path)
    with pytest.raises(StoreError, match="newer than this ablate"):
        store.runs("exp")


def test_write_run_checks_columns(store: Store) -> None:
    bad = make_run()
    del bad["config_hash"]
    with pytest.raises(StoreError, match="lacks required columns: config_hash"):
        store.write_run(bad, [], [])
    with pytest.raises(StoreError, match="not in schema"):
        store.write_run({**make_run(), "colour": "red"}, [], [])
    with pytest.raises(StoreError, match="status='weird'"):
        store.write_run({**make_run(), "status": "weird"}, [], [])
    assert len(store.runs("exp")) == 0


def test_curves_of_unfinished_write_are_hidden(store: Store) -> None:
    """The runs row is the commit point: curves/steps written before a crash do not show."""
    store.write_run(make_run(), CURVE, STEPS)
    orphan = pa.Table.from_pylist([{"run_id": "ghost-s0-x-a1", "experiment": "exp", "arm": "ghost", "seed": 0,
                                    "step": 0, "val_loss": 1.0, "train_time_ms": 0.0}], schema=CURVES_SCHEMA)
    pq.write_table(orphan, Path(store.root) / "exp" / "curves" / "ghost-s0-x-a1.parquet")
    assert set(store.curves("exp")["run_id"]) == {"baseline-s0-abcdefabcdef-a1"}


def test_inflight_markers(store: Store) -> None:
    store.mark_inflight("exp", "baseline-s0-abcdefabcdef-a1", {"run_id": "baseline-s0-abcdefabcdef-a1", "arm": "baseline"})
    store.mark_inflight("exp", "lr-s0-x-a1", {"run_id": "lr-s0-x-a1", "arm": "lr"})
    assert {m["run_id"] for m in store.inflight("exp")} == {"baseline-s0-abcdefabcdef-a1", "lr-s0-x-a1"}
    store.write_run(make_run(), CURVE, STEPS)  # finishing a run clears its marker
    assert [m["run_id"] for m in store.inflight("exp")] == ["lr-s0-x-a1"]
    store.clear_inflight("exp")
    assert store.inflight("exp") == []


class _HalfWriteFS:
    """Delegates to a real filesystem; the N-th output stream writes half its bytes, then fails."""

    def __init__(self, fs, fail_at: int) -> None:
        self._fs, self._left = fs, fail_at

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open_output_stream(self, path, *a, **kw):
        real = self._fs.open_output_stream(path, *a, **kw)
        self._left -= 1
        if self._left:
            return real
        outer = self

        class Half:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, data):
                real.write(data[: len(data) // 2])
                outer.torn = path
                raise OSError("disk full (simulated)")

        return Half()


@pytest.mark.parametrize("fail_at", [1, 3], ids=["curve-file", "runs-file"])
def test_write_failing_half_way_leaves_no_partial_file(store: Store, fail_at: int) -> None:
    store.write_run(make_run("baseline", 0), CURVE, STEPS)
    real = store.fs
    store.fs = _HalfWriteFS(real, fail_at)
    with pytest.raises(StoreError, match="disk full"):
        store.write_run(make_run("lr", 0, order=1), CURVE, STEPS)
    assert "/." in store.fs.torn  # it was writing a hidden temp file ...
    store.fs = real
    files = sorted(p.name for p in Path(store.root).rglob("*") if p.is_file())
    assert not [f for f in files if f.startswith(".")]  # ... which was removed
    assert "lr-s0-abcdefabcdef-a1.parquet" not in files or fail_at == 3  # curve/steps may exist, the row not
    runs = store.runs("exp")
    assert list(runs["run_id"]) == ["baseline-s0-abcdefabcdef-a1"]  # earlier data intact, no torn row
    assert set(store.curves("exp")["run_id"]) == {"baseline-s0-abcdefabcdef-a1"}


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.ablate.test_store import make_run
    from ablate.store.parquet import Store

    class SlowFS:  # writes in small chunks, so a kill lands inside a file
        def __init__(self, fs):
            self.fs = fs
        def __getattr__(self, name):
            return getattr(self.fs, name)
        def open_output_stream(self, path):
            real = self.fs.open_output_stream(path)
            class Slow:
                def __enter__(self):
                    return self
                def __exit__(self, *exc):
                    real.close()
                def write(self, data):
                    for i in range(0, len(data), 16384):
                        real.write(data[i:i + 16384])
                        real.flush()
                        time.sleep(0.005)
            return Slow()

    store = Store({uri!r})
    steps = [{{"step": k, "step_ms": 1.0, "train_time_ms": float(k)}} for k in range(100_000)]
    for i in range(1000):
        store.write_run(make_run("arm", i, order=i), [], steps)
        print(i, flush=True)
        store.fs = SlowFS(store.fs.fs if isinstance(store.fs, SlowFS) else store.fs)
""")


def test_writer_killed_mid_write_leaves_readable_store(tmp_path: Path) -> None:
    uri = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), uri=uri)], stdout=subprocess.PIPE,
                            text=True, cwd=str(ROOT))
    steps_dir = tmp_path / "store" / "exp" / "steps"
    try:
        assert proc.stdout.readline().strip() == "0", "writer died early"
        deadline = time.time() + 30
        while not any(p.name.startswith(".") for p in steps_dir.iterdir()):  # a temp file is being written
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.002)
        time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    torn = [p for p in (tmp_path / "store").rglob("*") if p.name.startswith(".") and p.is_file()]
    assert torn, "the kill should have interrupted a write"
    with pytest.raises(Exception):
        pq.read_table(torn[0])  # the interrupted file really is partial ...
    store = Store(uri)  # ... and invisible: the store reads whole runs only
    runs = store.runs("exp")
    assert len(runs) >= 1
    for path in (tmp_path / "store" / "exp").rglob("*.parquet"):
        if not path.name.startswith("."):
            pq.read_table(path)
    steps = store.steps("exp")
    assert (steps.groupby("run_id").size() == 100_000).all()
    assert set(steps["run_id"]) == set(runs["run_id"])


def test_bad_uri() -> None:
    with pytest.raises(StoreError, match="not usable"):
        Store("nosuchscheme-xyz://bucket/x")


def test_status_command_counts_missing_and_in_flight(store: Store) -> None:
    from typer.testing import CliRunner

    from ablate.cli.main import app
    from ablate.spec.model import parse_spec_text

    text = ("name: exp\ntrainer: {preset: tiny}\narms: {baseline: {}, lr: {optim.muon.lr: 0.05}}\nseeds: 2\n"
            "resources: {gpus_per_run: 0}\n")
    spec = parse_spec_text(text)
    store.write_bytes("exp", "spec.yaml", text.encode())
    for arm, seed, status, order in [("baseline", 0, "ok", 0), ("lr", 0, "ok", 1), ("baseline", 1, "failed", 2)]:
        h = spec.config_hash(arm)
        store.write_run({**make_run(arm, seed, status=status, order=order), "config_hash": h,
                         "run_id": f"{arm}-s{seed}-{h}-a1"}, CURVE, STEPS)
    store.mark_inflight("exp", "lr-s1-x-a1", {"run_id": "lr-s1-x-a1", "arm": "lr", "seed": 1})
    res = CliRunner().invoke(app, ["status", "exp", "--store", store.uri], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.output.splitlines() if line.startswith("│")}
    # columns: ok, diverged, failed, cancelled, in flight, missing
    assert rows["baseline"] == ["1", "0", "1", "0", "0", "1"]
    assert rows["lr"] == ["1", "0", "0", "0", "1", "1"]
    assert "in flight: lr-s1-x-a1" in res.output
    missing = CliRunner().invoke(app, ["status", "nope", "--store", store.uri])
    assert missing.exit_code == 2 and "experiment='nope' is not in store" in missing.output


def test_status_of_a_finished_search_misses_nothing(store: Store) -> None:
    """A search's spec arms run on the confirmation's seeds (1000..), not on `seeds:`."""
    from typer.testing import CliRunner

    from ablate.cli.main import app
    from tests.ablate.searchstore import write_search_experiment

    write_search_experiment(store, "srch")
    res = CliRunner().invoke(app, ["status", "srch", "--store", store.uri], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.output.splitlines() if line.startswith("│")}
    # columns: ok, diverged, failed, cancelled, in flight, missing
    assert rows["baseline"] == ["2", "0", "0", "0", "0", "0"]
    assert rows["t1"] == ["4", "0", "0", "0", "0", "0"]        # 2 search seeds + 2 confirmation seeds
    assert rows["t2"] == ["1", "1", "0", "0", "0", "0"]
    assert rows["total"][-1] == "0"
    assert "search: 3 of 3 suggestions have runs" in res.output

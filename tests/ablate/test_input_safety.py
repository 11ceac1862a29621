"""Untrusted input: YAML aliases, sizes, markup in values, names that escape the store, int64
seeds, non-finite numbers, every spec problem in one round, S3 causes; and the CLI's exit-code
table, --version and --dry-run summaries. No Ray.

    python -m pytest tests/ablate/test_input_safety.py -q
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli.main import app
from ablate.errors import EXIT_CODES, SpecError, StoreError
from ablate.spec.model import load_spec, parse_spec_text
from ablate.store.parquet import Store
from tests.ablate.test_spec import GOOD, _replace


def _bomb(levels: int = 9) -> str:
    """The classic "billion laughs": 9 levels of 9 aliases, ~600 bytes → 9^9 strings."""
    text = 'name: demo\nlol: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for n in "bcdefghijk"[:levels - 1]:
        text += f"{n}: &{n} [{', '.join(['*' + prev] * 9)}]\n"
        prev = n
    return text


def test_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    assert path.stat().st_size < 700
    t0 = time.time()
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    assert "YAML alias *a on line 3 is not allowed" in res.output
    assert time.time() - t0 < 5


def test_oversized_and_endless_spec_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(GOOD + "#" * (2 * 1024 * 1024) + "\n")
    for path in (big, Path("/dev/zero")):
        res = CliRunner().invoke(app, ["validate", str(path)])
        assert res.exit_code == 2 and "larger than 1024 KiB" in res.output, res.output


def test_values_print_as_written_never_as_markup(tmp_path: Path) -> None:
    path = tmp_path / "markup.yaml"
    path.write_text(_replace("name: demo", "name: '[/]'"))
    for cmd in (["validate", str(path)], ["run", str(path), "--store", str(tmp_path / "s")]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 2 and res.exception is None or isinstance(res.exception, SystemExit), res.output
        assert "name='[/]'" in res.output
        assert "must match [a-z0-9][a-z0-9_.-]*" in res.output  # the hint keeps its brackets
    res = CliRunner().invoke(app, ["status", "[/]", "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "experiment='[/]' is not a valid experiment name" in res.output
    # a value inside the run matrix (--dry-run's overrides column)
    path.write_text(_replace("optim.muon.lr: 0.05", "optim.muon.lr: 0.05, data.data_dir: '[bold]x[/]'"))
    res = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", str(tmp_path / "s")],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert '"data.data_dir":"[bold]x[/]"' in res.output


@pytest.mark.parametrize("args", [["report", "../x"], ["table", "../x"], ["status", "../x"],
                                  ["rm", "../x", "--yes"], ["status", "a/b"], ["report", "x\n"]])
def test_every_command_checks_the_experiment_name(tmp_path: Path, args: list[str]) -> None:
    store = tmp_path / "inner" / "store"
    res = CliRunner().invoke(app, [*args, "--store", str(store)])
    assert res.exit_code == 2, res.output
    assert "not a valid experiment name" in res.output
    assert not (tmp_path / "inner" / "x").exists() and not (tmp_path / "inner" / "x" / "report.md").exists()
    with pytest.raises(SpecError):
        Store(str(store)).write_bytes("../x", "report.md", b"#")
    with pytest.raises(SpecError):
        Store(str(store)).write_bytes("exp", "../../x.md", b"#")


@pytest.mark.parametrize("text,needle", [
    (_replace("seeds: 2", f"seeds: [0, {2**63}]"), "integers in 0..9223372036854775807"),
    (_replace("seeds: 2", "seeds: 1000000000000"), "at most 10000 seeds per arm"),
    (_replace("optim.muon.lr: 0.05", "optim.muon.lr: .nan"), "arms.lr-0.05.optim.muon.lr=nan: not a finite number"),
    (_replace("schedule.cooldown_frac: 0.5", "schedule.cooldown_frac: .inf"),
     "trainer.set.schedule.cooldown_frac=inf: not a finite number"),
    (_replace("cpu_ranks_per_run: 2}", "cpu_ranks_per_run: 2, timeout_s: .inf}"), "finite number"),
    (GOOD + "target_loss: .nan\n", "finite number"),
    (GOOD + "retries: 1000000\n", "must be in 0..100"),
])
def test_out_of_range_and_non_finite_numbers(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text(text)
    assert needle in str(info.value)


def test_a_seed_beyond_int64_never_reaches_a_half_written_store(store: Store) -> None:
    from tests.ablate.test_store import CURVE, STEPS, make_run

    with pytest.raises(StoreError, match="does not fit the curves schema"):
        store.write_run(make_run(seed=2**63), CURVE, STEPS)
    assert not [p for p in Path(store.root).rglob("*") if p.is_file()]  # no file, no temp file


def test_validate_reports_every_problem_in_one_round(tmp_path: Path) -> None:
    """Schema, arm names, trainer overrides and the search space: four mistakes, one round."""
    text = """\
name: demo
trainer: {preset: tiny}
arms:
  baseline: {}
  "bad name": {}
  lr: {optim.muon.lrr: 0.05}
seeds: 0
resources: {gpus_per_run: 0, cpu_ranks_per_run: 2}
search:
  trials: 2
  space:
    optim.muon.lrx: {type: float, low: 0.01, high: 0.1}
"""
    path = tmp_path / "four.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert "4 problems" in msg, msg
    for needle in ("seeds=0: need at least 1 seed", "arm name(s) 'bad name'",
                   "arms.lr: unknown config key 'optim.muon.lrr'", "search.space: unknown config key 'optim.muon.lrx'"):
        assert needle in msg, needle


def test_import_logs_reads_regular_files_of_bounded_size(tmp_path: Path) -> None:
    from ablate.store.importlogs import LogFormatError, read_log

    t0 = time.time()
    res = CliRunner().invoke(app, ["import-logs", "/dev/zero", "--experiment", "x", "--arm", "r",
                                   "--store", str(tmp_path / "s")])
    assert res.exit_code == 1 and "/dev/zero: not a regular file" in res.output
    assert time.time() - t0 < 10
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(LogFormatError, match="larger than"):
        read_log(big, max_bytes=1024)


def test_s3_errors_keep_their_cause() -> None:
    with pytest.raises(StoreError) as info:
        Store("s3://bucket/prefix?region=us-east-1&colour=red")
    assert "Unexpected query parameter in S3 URI: 'colour'" in str(info.value)
    assert "s3fs" not in str(info.value)


def test_exit_code_table_and_version() -> None:
    from ablate import __version__

    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for code, text in EXIT_CODES:
        assert f"{code} {text[:40]}" in " ".join(res.output.split()), code
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"ablate {__version__}"


def test_dry_run_summarises_a_large_matrix(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(_replace("seeds: 2", "seeds: 500").replace("  lr-0.05:", "  lr-0.03: {optim.muon.lr: 0.03}\n  lr-0.05:"))
    res = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", str(tmp_path / "s")],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in res.output.splitlines() if line.startswith("│")]
    assert [r[:6] for r in rows] == [[a, "500", "0..499", "0", "500", "0"] for a in ("baseline", "lr-0.03", "lr-0.05")]
    assert "1500 runs, summarised per arm" in " ".join(res.output.split())


def test_no_finished_line_when_nothing_was_planned() -> None:
    import io

    from rich.console import Console

    from ablate.run.progress import RunProgress

    buf = io.StringIO()
    with pytest.raises(SpecError):
        with RunProgress(Console(file=buf, width=120), title="x"):
            raise SpecError("no node can hold one run")
    assert "finished" not in buf.getvalue()
    with RunProgress(Console(file=buf, width=120), title="x") as p:
        p.add(1)
        p.finished("a-s0-x-a1", "failed", error="input error (not retried): DataError: no shards\nexit code 1")
    assert "[1/1, 1 failed]: input error (not retried): DataError: no shards" in buf.getvalue()
    assert "finished: 1/1 runs" in buf.getvalue()


def test_dead_end_input_errors_are_the_trainers() -> None:
    """ablate's list of non-retried error types is the trainer's INPUT_ERRORS (+ usage errors)."""
    from ablate.run.driver import INPUT_ERROR_TYPES
    from trainer.train import INPUT_ERRORS

    assert set(INPUT_ERROR_TYPES) == {e.__name__ for e in INPUT_ERRORS} | {"UsageError"}
    assert os.environ.get("ABLATE_NEVER_SET") is None

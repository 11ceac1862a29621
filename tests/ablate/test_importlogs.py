"""`ablate import-logs` on fixture logs in the speedrun format: complete, truncated, garbage.

    python -m pytest tests/ablate/test_importlogs.py -q

Fixtures (tests/ablate/fixtures/logs/): complete_a.txt and complete_b.txt reach step 20/20 with a
final val_loss; truncated.txt stops at step 13/20; garbage.txt is not a log.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ablate.cli.analysis import register
from ablate.store.importlogs import LogFormatError, import_logs, parse_log
from ablate.store.parquet import Store

LOGS = Path(__file__).parent / "fixtures" / "logs"


def test_parse_complete_log():
    log = parse_log((LOGS / "complete_a.txt").read_bytes())
    assert log.status == "ok" and log.error is None
    assert (log.total_steps, log.last_step) == (20, 20)
    assert log.final_val_loss == 3.2791 and log.train_time_ms == 1625.0
    assert [c["step"] for c in log.curve] == [0, 5, 10, 15, 20]
    assert log.curve[0] == {"step": 0, "val_loss": 10.8258, "train_time_ms": 0.0}
    assert [s["step"] for s in log.steps] == list(range(1, 21))
    # per-step time = difference of cumulative train_time between consecutive step lines
    assert log.steps[0]["step_ms"] == log.steps[0]["train_time_ms"]
    assert log.steps[5]["step_ms"] == log.steps[5]["train_time_ms"] - log.steps[4]["train_time_ms"]
    assert log.gpu_names == ["NVIDIA H100 80GB HBM3"] * 2
    assert (log.torch_version, log.cuda_version, log.python_version, log.triton_version, log.driver) == (
        "2.10.0.dev20251021+cu128", "12.8", "3.12.7", "3.5.0", "570.172.08")
    assert log.started_at.isoformat() == "2025-12-11T09:41:07+00:00"
    assert log.peak_mem_mib == 29863.0


def test_parse_truncated_log_is_a_failed_run():
    log = parse_log((LOGS / "truncated.txt").read_bytes())
    assert log.status == "failed" and log.final_val_loss is None
    assert "step 13/20" in log.error and log.last_step == 13


@pytest.mark.parametrize("data,match", [
    ((LOGS / "garbage.txt").read_bytes(), "no line of '=' characters"),
    (b"print('hi')\n" + b"=" * 100 + b"\nRunning Python 3.12\n", "no `step:N/M"),
    (b"\x00\x01binary", "binary file"),
    (b"\xff\xfe\xfa" + b"=" * 30, "not UTF-8"),
    (b"x\n" + b"=" * 50 + b"\nstep:1/20 train_time:60ms step_avg:60.00ms\nstep:1/30 train_time:60ms step_avg:60.00ms\n",
     "line 4: step total 30 differs from 20"),
])
def test_malformed_logs_raise_clear_errors(data, match):
    with pytest.raises(LogFormatError, match=match):
        parse_log(data)


def test_import_all_fixture_logs(tmp_path):
    store = Store(str(tmp_path / "res"))
    results = import_logs(store, [LOGS], "upstream", "record")
    by_name = {Path(r.path).name: r for r in results}
    assert sorted(by_name) == ["complete_a.txt", "complete_b.txt", "garbage.txt", "truncated.txt"]
    assert by_name["garbage.txt"].error and by_name["garbage.txt"].run_id is None
    assert [by_name[n].seed for n in ("complete_a.txt", "complete_b.txt", "truncated.txt")] == [0, 1, 2]

    runs = store.runs("upstream").set_index("seed")
    assert list(runs["status"]) == ["ok", "ok", "failed"]
    assert set(runs["source"]) == {"import"}
    assert runs.loc[0, "final_val_loss"] == 3.2791 and runs.loc[1, "final_val_loss"] == 3.2768
    assert runs.loc[2, "error"].startswith("log ends at step 13/20")
    assert runs.loc[0, "gpu_model"] == "NVIDIA H100 80GB HBM3" and runs.loc[0, "gpu_count"] == 2
    assert runs.loc[0, "torch_version"] == "2.10.0.dev20251021+cu128"
    assert runs.loc[0, "run_id"].startswith("record-import-")
    curves, steps = store.curves("upstream"), store.steps("upstream")
    assert len(curves[curves["run_id"] == runs.loc[0, "run_id"]]) == 5
    assert len(steps[steps["run_id"] == runs.loc[2, "run_id"]]) == 13


def test_same_log_twice_is_stored_once(tmp_path):
    store = Store(str(tmp_path / "res"))
    first = import_logs(store, [LOGS / "complete_a.txt"], "upstream", "record")
    copy = tmp_path / "renamed.txt"
    shutil.copy(LOGS / "complete_a.txt", copy)                       # same content, other name
    again = import_logs(store, [copy, LOGS / "complete_b.txt"], "upstream", "record")
    assert again[0].run_id == first[0].run_id and "already in the store" in again[0].note
    assert again[1].seed == 1                                          # next free index, stable
    assert len(store.runs("upstream")) == 2


def test_cli_exit_codes(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    uri = str(tmp_path / "res")
    res = runner.invoke(app, ["import-logs", str(LOGS / "complete_a.txt"), str(LOGS / "garbage.txt"),
                              "--experiment", "upstream", "--arm", "record", "--store", uri])
    assert res.exit_code == 1
    assert "garbage.txt: no line of '=' characters" in res.output
    assert "1 of 2 files imported" in res.output
    assert len(Store(uri).runs("upstream")) == 1                       # the good file still imported
    res = runner.invoke(app, ["import-logs", str(LOGS / "truncated.txt"), "--experiment", "upstream",
                              "--arm", "record", "--store", uri])
    assert res.exit_code == 0 and "imported as failed" in res.output
    res = runner.invoke(app, ["import-logs", str(LOGS / "complete_a.txt"), "--experiment", "Bad Name",
                              "--arm", "record", "--store", uri])
    assert res.exit_code == 2 and "--experiment" in res.output
    res = runner.invoke(app, ["import-logs", str(tmp_path / "missing.txt"), "--experiment", "upstream",
                              "--arm", "record", "--store", uri])
    assert res.exit_code == 1 and "cannot read" in res.output


@pytest.mark.parametrize("old,new,step", [
    (b"step:10/20 val_loss:7.0524", b"step:10/20 val_loss:nan", 10),      # mid-run; the final loss is finite
    (b"step:20/20 val_loss:3.2791", b"step:20/20 val_loss:inf", 20),      # final eval
])
def test_non_finite_loss_at_any_eval_is_diverged(old, new, step):
    data = (LOGS / "complete_a.txt").read_bytes()
    assert old in data
    log = parse_log(data.replace(old, new))
    assert log.status == "diverged" and log.final_val_loss is None
    assert log.error.startswith("diverged: val_loss is ") and f"at step {step}/20" in log.error


def test_target_is_stored_with_the_experiment(tmp_path):
    """`import-logs --target` → `ablate table` shows p(<target) without flags."""
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    uri = str(tmp_path / "res")
    res = runner.invoke(app, ["import-logs", str(LOGS / "complete_a.txt"), str(LOGS / "complete_b.txt"),
                              "--experiment", "upstream", "--arm", "record", "--store", uri, "--target", "3.28"])
    assert res.exit_code == 0, res.output
    assert "target loss 3.28 stored" in res.output
    res = runner.invoke(app, ["table", "upstream", "--store", uri, "--format", "json"])
    assert res.exit_code == 0, res.output
    import json

    doc = json.loads(res.stdout)
    assert doc["target"] == 3.28
    from scipy import stats as sps

    assert doc["arms"][0]["p_target"] == pytest.approx(
        sps.ttest_1samp([3.2791, 3.2768], 3.28, alternative="less").pvalue)
    res = runner.invoke(app, ["import-logs", str(LOGS / "complete_a.txt"), "--experiment", "upstream",
                              "--arm", "record", "--store", uri, "--target", "nan"])
    assert res.exit_code == 2 and "--target" in res.output


def test_logs_of_several_scripts_in_one_arm_are_named(tmp_path):
    other = tmp_path / "other.txt"
    other.write_bytes(b"# another script\n" + (LOGS / "complete_b.txt").read_bytes())
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["import-logs", str(LOGS / "complete_a.txt"), str(other), "--experiment",
                                   "upstream", "--arm", "record", "--store", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    assert "holds logs of 2 different training scripts" in res.output and "--all-configs" in res.output

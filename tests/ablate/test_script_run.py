"""Script runs without Ray: stdout → progress events, log → payload → runs row, the real launcher.

    python -m pytest tests/ablate/test_script_run.py -q

The end-to-end path (Ray Tune + torchrun + store + table + report) is in tests/ablate/test_e2e.py
(`test_script_arms_...`); the fake record script is tests/ablate/fixtures/script/train_gpt.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from ablate.run.launch import LaunchResult, run_process
from ablate.run.script_trial import RecordLines, code_path, data_link, find_log, outcome, script_command, store_code
from ablate.store.parquet import Store

FAKE = Path(__file__).resolve().parent / "fixtures" / "script"
LOG = textwrap.dedent("""\
    import os
    print("a script")
    ====================================================================================================
    Running Python 3.12.7 (main, Dec 11 2025, 08:13:04) [GCC 13.2.0]
    Running PyTorch 2.10.0.dev20251210+cu126 compiled for CUDA 12.6
    Running Triton version 3.6.0
    |   0  NVIDIA H100 80GB HBM3          On  |   00000000:61:00.0 Off |                    0 |
    ====================================================================================================
    step:0/4 val_loss:10.8258 train_time:0ms step_avg:0.03ms
    step:1/4 train_time:100ms step_avg:100.00ms
    step:2/4 train_time:220ms step_avg:110.00ms
    step:2/4 val_loss:{mid} train_time:220ms step_avg:110.00ms
    step:3/4 train_time:330ms step_avg:110.00ms
    step:4/4 train_time:440ms step_avg:110.00ms
    {last}
    peak memory allocated: 30078 MiB reserved: 45076 MiB
    """)
JOB = {"ranks": 2, "gpus": 2, "script_config": {"script": {"name": "train_gpt.py", "sha256": "s" * 64}},
       "script_sha256": "s" * 64}


def _log(mid: str = "4.0", last: str = "step:4/4 val_loss:3.2800 train_time:440ms step_avg:110.00ms") -> bytes:
    return LOG.format(mid=mid, last=last).encode()


def _res(rc: int = 0, stopped: str | None = None, stderr: tuple[str, ...] = (), events=()) -> LaunchResult:
    return LaunchResult(returncode=rc, stopped=stopped, stderr_tail=list(stderr), events=list(events),
                        started_at=100.0, ended_at=160.0)


def test_stdout_lines_become_progress_events() -> None:
    lines = RecordLines()
    evs = [lines(s) for s in ("logs/abc.txt\n", "step:0/4 val_loss:10.8258 train_time:0ms step_avg:0.03ms\n",
                              "step:1/4 train_time:100ms step_avg:100.00ms\n", "some warning\n",
                              "step:3/4 train_time:340ms step_avg:113.33ms\n",
                              "step:4/4 val_loss:nan train_time:440ms step_avg:110.00ms\n")]
    assert evs[0] == {"event": "start", "logfile": "logs/abc.txt"} and lines.logfile == "logs/abc.txt"
    assert evs[1] == {"event": "val", "step": 0, "total": 4, "val_loss": 10.8258, "train_time_ms": 0.0}
    assert evs[2]["event"] == "step" and evs[2]["step_ms"] == 100.0 and evs[3] is None
    assert evs[4]["step_ms"] == 120.0  # (340 - 100) / 2 steps: the lines of skipped steps are averaged
    assert math.isnan(evs[5]["val_loss"]) and lines.first_at is not None
    assert len(lines.record_lines) == 4


def test_complete_log_gives_the_trainer_payload() -> None:
    p = outcome(_res(), RecordLines(), "logs/x.txt", _log(), JOB, {"gpu_uuids": ["GPU-a", "GPU-b"],
                                                                    "gpu_name": "NVIDIA H200", "driver": "570.1"})
    assert p["ok"] and p["status"] is None and p["error"] is None
    assert p["end"] == {"final_val_loss": 3.28, "train_time_ms": 440.0, "steps": 4, "peak_mem_mib": 30078.0}
    env = p["start"]["env"]
    assert (env["torch"], env["cuda"], env["triton"], env["python"]) == ("2.10.0.dev20251210+cu126", "12.6", "3.6.0",
                                                                          "3.12.7")
    assert env["gpu_name"] == "NVIDIA H200" and env["gpu_uuids"] == ["GPU-a", "GPU-b"] and env["gpu_count"] == 2
    assert p["start"]["config"]["log"] == {"source": "logs/x.txt", "total_steps": 4, "last_step": 4,
                                           "log_sha256": p["start"]["config"]["log"]["log_sha256"]}
    assert [c["step"] for c in p["curve"]] == [0, 2, 4] and [s["step_ms"] for s in p["steps"]] == [100, 120, 110, 110]
    assert p["script_log"].startswith("=" * 100) and "a script" not in p["script_log"]  # the script is kept apart


def test_crash_truncation_nan_and_no_log() -> None:
    crash = outcome(_res(1, stderr=("Traceback (most recent call last):", "RuntimeError: boom")), RecordLines(),
                    "logs/x.txt", _log(last="step:4/4 train_time:440ms step_avg:110.00ms"), JOB)
    assert not crash["ok"] and crash["end"] is None and len(crash["curve"]) == 2
    assert crash["error"].startswith("exit code 1\nits log ends at step 4/4 without a final val_loss line")
    assert crash["error"].endswith("RuntimeError: boom")
    trunc = outcome(_res(0), RecordLines(), "logs/x.txt", _log(last=""), JOB)
    assert trunc["error"] == ("the script exited 0 but its log ends at step 4/4 without a final val_loss line "
                              "(truncated, crashed or killed)")
    nan = outcome(_res(0), RecordLines(), "logs/x.txt", _log(mid="nan"), JOB)
    assert nan["status"] == "diverged" and nan["error"].startswith("diverged: val_loss is nan at step 2/4")
    timeout = outcome(_res(143, stopped="timeout after 60 s (resources.timeout_s)"), RecordLines(), None, None, JOB)
    assert timeout["error"].startswith("stopped: timeout after 60 s (resources.timeout_s)\nexit code 143\nthe script "
                                       "printed no `step:N/M")
    # no log file: the record lines on stdout are the log
    lines = RecordLines()
    for s in _log().decode().splitlines()[8:]:
        lines(s)
    p = outcome(_res(0), lines, None, None, JOB)
    assert p["ok"] and p["end"]["final_val_loss"] == 3.28 and p["start"]["config"]["log"]["source"] == "stdout"
    assert p["script_log"] is None and p["start"]["env"]["torch"] is None
    bad = outcome(_res(0), RecordLines(), "logs/x.txt", b"no separator here\n", JOB)
    assert bad["error"].startswith("the log file logs/x.txt: no line of '=' characters")


def test_build_row_of_a_script_run(tmp_path: Path) -> None:
    """The payload becomes a runs row like a trainer run's: source=script, its sha256, provenance."""
    from ablate.spec.matrix import PlannedRun, make_request
    from ablate.run.driver import Attempt, build_row
    from ablate.run.script_trial import job
    from ablate.spec.model import load_spec
    from tests.ablate.test_script_spec import make

    spec = load_spec(make(tmp_path))
    req = make_request(spec, "no-smear", 3)
    att = Attempt(PlannedRun(req, "todo", 1, 1), order=4)
    att.job = job(spec, req, att.run_id)
    assert att.job["code"][0]["name"] == "train_gpt.py" and "smear = False" in att.job["code"][0]["text"]
    assert att.job["env"] == {} and att.job["ranks"] == 2 and att.job["kind"] == "script"
    payload = {**outcome(_res(), RecordLines(), "logs/x.txt", _log(), att.job), "node_id": "n", "node_ip": "1.1.1.1"}
    row, curve, steps = build_row(spec, att, payload, {"python": "3.11", "git_commit": "drv"})
    assert (row["source"], row["status"], row["final_val_loss"], row["world_size"]) == ("script", "ok", 3.28, 2)
    assert row["script_sha256"] == spec._scripts["no-smear"].script.sha256 and row["config_hash"] == req.config_hash
    assert row["run_id"] == f"no-smear-s3-{req.config_hash}-a1" and row["git_commit"] == "drv"
    cfg = json.loads(row["config_json"])
    assert cfg["script"]["sha256"] == row["script_sha256"] and cfg["script"]["patches"][0]["path"] == "my/no_smear.diff"
    assert json.loads(row["overrides_json"]) == {"script": "records/train_gpt.py", "patch": ["my/no_smear.diff"]}
    assert len(curve) == 3 and len(steps) == 4
    # a Ray trial error (no payload from the trial): the script's identity is still in the row
    row, _, _ = build_row(spec, att, {"ok": False, "error": "Ray trial failed"}, {"git_commit": "drv"})
    assert row["status"] == "failed" and json.loads(row["config_json"])["script"]["sha256"] == row["script_sha256"]
    nan = {**payload, **outcome(_res(), RecordLines(), "logs/x.txt", _log(mid="nan"), att.job)}
    row, _, _ = build_row(spec, att, nan, {})
    assert row["status"] == "diverged" and row["error"].startswith("diverged: val_loss is nan at step 2/4")
    # the code goes into the store once per sha256
    store = Store(str(tmp_path / "store"))
    store_code(store, "premul-o", [att.job, att.job])
    rel = code_path("train_gpt.py", row["script_sha256"])
    assert store.read_bytes("premul-o", rel).decode() == att.job["code"][0]["text"]
    # the log lives and goes with its run (ablate rm)
    from ablate.run.script_trial import write_log

    write_log(store, "premul-o", row["run_id"], payload)
    store.write_run(row, curve, steps)
    assert store.read_bytes("premul-o", f"logs/{row['run_id']}.txt").decode() == payload["script_log"]
    store.remove_runs("premul-o", [row["run_id"]])
    assert store.read_bytes("premul-o", f"logs/{row['run_id']}.txt") is None and store.runs("premul-o").empty


def test_find_log_prefers_the_named_file(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.txt").write_text("A")
    (tmp_path / "logs" / "b.txt").write_text("B")
    os.utime(tmp_path / "logs" / "a.txt", (1, 1))
    assert find_log(str(tmp_path), "logs/a.txt") == ("logs/a.txt", b"A")
    assert find_log(str(tmp_path), None) == ("logs/b.txt", b"B")  # the newest
    assert find_log(str(tmp_path), "../../etc/passwd") == ("logs/b.txt", b"B")  # never outside the folder
    assert find_log(str(tmp_path / "nowhere"), None) == (None, None)


@pytest.mark.dist
def test_two_ranks_through_torchrun_and_the_guard(tmp_path: Path) -> None:
    """The real launcher on the fake record script with 2 gloo ranks, in its own working directory."""
    work = tmp_path / "run"
    shutil.copytree(FAKE, work)
    lines, seen = RecordLines(), []
    (tmp_path / "shards" / "fineweb10B").mkdir(parents=True)
    assert data_link(str(work), str(tmp_path / "shards"), tmp_path) == tmp_path / "shards"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATA_PATH": str(work), "SEED": "1", "FAKE_NAN_AT": "4"}
    res = run_process(script_command(2, "train_gpt.py", []), env=env, cwd=str(work), parse=lines,
                      on_event=seen.append)
    assert res.returncode == 0, res.stderr_tail
    assert [e["event"] for e in seen][:3] == ["start", "val", "step"] and lines.logfile.startswith("logs/")
    name, data = find_log(str(work), lines.logfile)
    p = outcome(res, lines, name, data, {**JOB, "gpus": 0})
    assert p["status"] == "diverged" and [c["step"] for c in p["curve"]] == [0, 2, 4, 6]
    assert "SEED=1 WORLD_SIZE=2 allreduce=1 data=['fineweb10B']" in p["script_log"]  # both ranks joined
    assert p["curve"][0]["val_loss"] == pytest.approx(3.0 + 1.0 + 0.01 + 0.001)
    assert script_command(8, "train_gpt.py", ["--x"]) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node=8", "train_gpt.py", "--x"]


def test_live_events_of_a_real_record_log_match_the_import_parser() -> None:
    """A record log's console lines (2026-07-17 record, tests/ablate/fixtures/record_log) fed as
    stdout give the same curve and step times live as import-logs' parser gives from the file."""
    from ablate.store.importlogs import parse_log

    data = (Path(__file__).resolve().parent / "fixtures" / "record_log" / "fp8_9829ec4f.txt").read_bytes()
    want = parse_log(data)
    lines = RecordLines()
    events = [e for e in map(lines, data.decode().splitlines(keepends=True)) if e]
    curve = [{k: e[k] for k in ("step", "val_loss", "train_time_ms")} for e in events if e["event"] == "val"]
    steps = [{k: e[k] for k in ("step", "step_ms", "train_time_ms")} for e in events if e["event"] == "step"]
    assert curve == want.curve and len(curve) > 5
    assert steps == want.steps and len(steps) > 1000
    p = outcome(_res(), lines, None, None, JOB)  # no file: stdout alone gives the same result
    assert p["ok"] and p["end"]["final_val_loss"] == want.final_val_loss and p["end"]["steps"] == want.last_step

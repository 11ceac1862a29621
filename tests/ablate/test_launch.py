"""ablate.run.launch: event streaming, failures, timeouts and killing whole process trees (no Ray).

    python -m pytest tests/ablate/test_launch.py -q

Uses tests/ablate/fake_trainer.py (prints contract events, no torch) except the torchrun test.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ablate.run.launch import without_torchrun_report, descendants, parse_line, run_process, torchrun_command

ROOT = Path(__file__).resolve().parents[2]
FAKE = str(Path(__file__).parent / "fake_trainer.py")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    end = time.time() + timeout
    while time.time() < end:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_events_stream_in_order(tmp_path: Path) -> None:
    seen: list[str] = []
    res = run_process([sys.executable, FAKE, "--steps", "4", "--noise", "--seed", "3"], on_event=lambda e: seen.append(e["event"]))
    assert res.ok and res.returncode == 0 and res.error_text() is None
    assert seen == ["start", "warmup", "val", "step", "step", "val", "step", "step", "val", "end"]
    assert [e["step"] for e in res.curve] == [0, 2, 4]
    assert [e["step"] for e in res.steps] == [1, 2, 3, 4]
    assert res.noise_count == 1 and res.noise == ["this line is not JSON"]
    assert res.first("start")["seed"] == 3
    assert res.last("end")["final_val_loss"] == pytest.approx(5.03 - 0.4)
    assert res.start_event_at is not None and res.started_at <= res.start_event_at <= res.ended_at


def test_trainer_failure_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "ov.yaml"
    cfg.write_text("debug: {fail_at_step: 2, exit_code: 3}\n")
    res = run_process([sys.executable, FAKE, "--config", str(cfg)])
    assert not res.ok and res.returncode == 3
    text = res.error_text()
    assert text.startswith("RuntimeError: debug.fail_at_step=2")
    assert "exit code 3" in text and "stderr (last lines)" in text


def test_exit_zero_without_end_is_a_failure() -> None:
    res = run_process([sys.executable, "-c", "print('{\"event\": \"start\", \"t\": 0}')"])
    assert res.returncode == 0 and not res.ok
    assert "without an `end` event" in res.error_text()


def test_timeout_kills_the_tree_including_new_session_children() -> None:
    t0 = time.time()
    res = run_process([sys.executable, FAKE, "--hang", "--spawn-orphan"], timeout_s=1.0, grace_s=1.0)
    assert time.time() - t0 < 10
    assert not res.ok and res.stopped.startswith("timeout after 1 s")
    orphan = int(next(line for line in res.stderr_tail if line.startswith("ORPHAN")).split()[1])
    assert _wait_gone([orphan], 5.0) == []  # it was in its own session: killpg alone would miss it


def test_stop_event_cancels() -> None:
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    res = run_process([sys.executable, FAKE, "--hang"], stop=stop, grace_s=1.0)
    assert res.stopped == "cancelled" and not res.ok


PARENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from ablate.run.launch import run_process
    run_process({cmd!r}, cwd={root!r}, grace_s=1.0, remove_after={rm!r})
""")


def _parent_then_sigkill(cmd: list[str], settle: float, rm: list[str] = ()) -> tuple[list[int], subprocess.Popen]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(root=str(ROOT), cmd=cmd, rm=list(rm))], cwd=str(ROOT))
    end = time.time() + 60
    tree: list[int] = []
    while time.time() < end:
        tree = descendants(parent.pid)
        if len(tree) >= settle:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    tree = descendants(parent.pid)
    parent.send_signal(signal.SIGKILL)  # no cleanup possible in the parent
    parent.wait()
    return tree, parent


def test_parent_sigkill_kills_the_tree(tmp_path: Path) -> None:
    # parent → guard → fake trainer → orphan in a new session
    cfg = tmp_path / "overrides.yaml"
    cfg.write_text("{}\n")
    tree, _ = _parent_then_sigkill([sys.executable, FAKE, "--hang", "--spawn-orphan"], settle=3, rm=[str(cfg)])
    assert len(tree) >= 3
    assert _wait_gone(tree) == []
    assert not cfg.exists()  # the guard removed the run's temporary config file


def test_torchrun_ranks_die_with_the_parent() -> None:
    """torchrun puts every rank in its own session; none may survive a SIGKILLed Ray worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", FAKE,
           "--hang", "--steps", "100", "--sleep", "6"]
    tree, _ = _parent_then_sigkill(cmd, settle=4)  # guard, torchrun, 2 ranks
    assert len(tree) >= 4, tree
    assert _wait_gone(tree) == []


def test_torchrun_command() -> None:
    cmd = torchrun_command(4, "small", "/abs/ov.yaml", 7)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "trainer.train",
                       "--preset", "small", "--config", "/abs/ov.yaml", "--seed", "7"]
    assert not any("master_port" in c or "rdzv" in c for c in cmd)  # free port per launch


def test_parse_line() -> None:
    assert parse_line('{"event": "val", "t": 1, "step": 0}\n') == {"event": "val", "t": 1, "step": 0}
    for line in ("", "hello", "{not json", '{"no_event": 1}', "[1, 2]", '{"event": 3}'):
        assert parse_line(line) is None


def test_torchrun_report_is_trimmed_from_error_tail() -> None:
    lines = ["RuntimeError: boom in rank 0", "Traceback (most recent call last):",
             '  File "/x/torch/distributed/run.py", line 9, in main', "ChildFailedError:", "====="]
    assert without_torchrun_report(lines) == ["RuntimeError: boom in rank 0"]
    assert without_torchrun_report(lines[1:]) == lines[1:]
    assert without_torchrun_report(["a", "b"]) == ["a", "b"]

"""Run one trainer process tree, stream its JSON-lines events, and never leave orphans. No Ray.

    from ablate.run.launch import run_process, torchrun_command
    res = run_process(torchrun_command(2, "tiny", "/tmp/ov.yaml", seed=0), cwd=root, on_event=print)

    python ablate/run/launch.py --grace 10 [--rm PATH] -- CMD ...   # the guard (started by run_process)

Why a guard: torchrun starts every rank in a session of its own (start_new_session=True in
torch.distributed.elastic), so killing torchrun's process group leaves the ranks running, and a
Ray worker killed with SIGKILL cannot clean up at all. `run_process` therefore starts this file as
a guard, in a new session (start_new_session=True); the guard makes itself a child subreaper
(orphaned ranks are re-parented to it), runs CMD in its own process group, and kills the whole tree
(SIGTERM to CMD, then SIGKILL to every descendant and os.killpg on its group) when CMD exits,
when it gets SIGTERM/SIGINT, or when its stdin closes, which happens whenever the process that
started it dies, however it dies. This file imports only the standard library so the guard
starts in ~30 ms.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

GUARD_GRACE_S = 10.0  # SIGTERM → SIGKILL delay for the trainer tree
STDERR_TAIL_LINES = 60


def torchrun_command(nproc: int, preset: str, config_file: str, seed: int, module: str = "trainer.train",
                     python: str = sys.executable) -> list[str]:
    """The trainer command line (contract: trainer CLI) under torchrun's standalone rendezvous.

    `--standalone` picks a free rendezvous port per launch, so two runs on one node never collide."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, "--preset", preset, "--config", config_file, "--seed", str(seed)]


@dataclass
class LaunchResult:
    """What one trainer process tree did."""

    returncode: int | None = None
    events: list[dict] = field(default_factory=list)  # every JSON event, in order
    stderr_tail: list[str] = field(default_factory=list)
    noise: list[str] = field(default_factory=list)  # non-JSON stdout lines (first few)
    noise_count: int = 0
    started_at: float = 0.0  # unix time the process was started
    start_event_at: float | None = None  # unix time the `start` event was read
    ended_at: float = 0.0
    stopped: str | None = None  # why we killed it ("timeout after 60s", "cancelled"), else None

    def first(self, name: str) -> dict | None:
        return next((e for e in self.events if e.get("event") == name), None)

    def last(self, name: str) -> dict | None:
        return next((e for e in reversed(self.events) if e.get("event") == name), None)

    @property
    def curve(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "val"]

    @property
    def steps(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "step"]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.stopped is None and self.last("end") is not None

    def error_text(self, max_chars: int = 4000) -> str | None:
        """Why the run failed: the trainer's `error` event, exit code, and the end of stderr."""
        if self.ok:
            return None
        parts = []
        if self.stopped:
            parts.append(f"stopped: {self.stopped}")
        err = self.last("error")
        if err:
            parts.append(f"{err.get('type', 'Error')}: {err.get('message', '')}")
        if self.returncode not in (0, None):
            parts.append(f"exit code {self.returncode}")
        elif self.last("end") is None and not self.stopped:
            parts.append(f"trainer exited {self.returncode} without an `end` event")
        tail = without_torchrun_report(self.stderr_tail)
        if tail:
            parts.append("stderr (last lines):\n" + "\n".join(tail[-20:]))
        text = "\n".join(parts)
        return text if len(text) <= max_chars else text[: max_chars // 4] + "\n...\n" + text[-3 * max_chars // 4:]


def without_torchrun_report(lines: list[str]) -> list[str]:
    """Drop torchrun's own traceback and ChildFailedError banner, which would push the rank's
    error out of the tail; keep everything if the rank printed nothing before it."""
    for i, line in enumerate(lines):
        if "torch/distributed/run.py" in line:
            cut = max((j for j in range(i) if lines[j].startswith("Traceback (most recent call last)")), default=i)
            return lines[:cut] or lines
    return lines


def parse_line(line: str) -> dict | None:
    """A contract event (JSON object with an "event" key), or None for any other line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("event"), str) else None


class Guarded:
    """A command under the guard (new session) with its stdout lines queued and stderr's tail kept."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None, cwd: str | None, grace_s: float,
                 remove_after: list[str] = ()) -> None:
        guard = [sys.executable, os.path.abspath(__file__), "--grace", str(grace_s)]
        guard += [a for path in remove_after for a in ("--rm", path)] + ["--", *argv]
        self.grace_s = grace_s
        try:
            self.proc = subprocess.Popen(guard, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=env, cwd=cwd, start_new_session=True, bufsize=1, text=True,
                                         errors="replace")
        except OSError as e:
            from ablate.errors import LaunchError

            raise LaunchError(f"cannot start {argv[0]!r} in {cwd!r}: {e}") from None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.threads = [threading.Thread(target=t, daemon=True) for t in (self._pump_stdout, self._pump_stderr)]
        for t in self.threads:
            t.start()

    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line)
        self.lines.put(None)

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.tail.append(line.rstrip("\n"))

    def consume(self, res: LaunchResult, *, on_event: Callable[[dict], None] | None, timeout_s: float | None,
                stop: threading.Event | None, until: Callable[[dict], bool] | None = None,
                parse: Callable[[str], dict | None] = parse_line) -> bool:
        """Read events into `res` until stdout ends (False) or `until(event)` is true (True).
        `parse` turns a stdout line into an event or None (default: the trainer's JSON lines).
        A timeout or `stop` kills the tree (then reads on to the end); so does any exception."""
        deadline = res.started_at + timeout_s if timeout_s else None
        try:
            while True:
                try:
                    line = self.lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if line is None:
                    return False
                if line:
                    ev = parse(line)
                    if ev is None:
                        res.noise_count += 1
                        if len(res.noise) < 20:
                            res.noise.append(line.rstrip("\n")[:500])
                    else:
                        if ev["event"] == "start" and res.start_event_at is None:
                            res.start_event_at = time.time()
                        res.events.append(ev)
                        if on_event is not None:
                            on_event(ev)
                        if until is not None and until(ev):
                            return True
                if deadline is not None and time.time() > deadline and res.stopped is None:
                    res.stopped = f"timeout after {timeout_s:g} s (resources.timeout_s)"
                    _terminate(self.proc, self.grace_s)
                if stop is not None and stop.is_set() and res.stopped is None:
                    res.stopped = "cancelled"
                    _terminate(self.proc, self.grace_s)
        except BaseException:
            res.stopped = res.stopped or "cancelled"
            self.kill()
            raise

    def kill(self) -> None:
        _terminate(self.proc, self.grace_s)

    def close(self) -> int:
        """Wait for the tree to be gone (after stdout ended or kill); its exit code."""
        rc = self.proc.wait()
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        for t in self.threads:
            t.join(timeout=2.0)
        return rc


def run_process(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                on_event: Callable[[dict], None] | None = None, timeout_s: float | None = None,
                stop: threading.Event | None = None, grace_s: float = GUARD_GRACE_S,
                remove_after: list[str] = (), parse: Callable[[str], dict | None] = parse_line) -> LaunchResult:
    """Run `argv` under the guard; call `on_event` (in this thread) for each event as it arrives.
    `parse` makes events of stdout lines: the trainer's JSON lines by default (ablate.run.script_trial
    passes a parser of the record scripts' text lines).

    Returns when the process tree is gone. `timeout_s` (wall clock) or `stop` being set kills
    the tree; so does any exception here (including KeyboardInterrupt). The guard deletes the
    files in `remove_after` once the tree is gone, even if the caller was killed."""
    res = LaunchResult(started_at=time.time())
    g = Guarded(argv, env=env, cwd=cwd, grace_s=grace_s, remove_after=remove_after)
    try:
        g.consume(res, on_event=on_event, timeout_s=timeout_s, stop=stop, parse=parse)
    finally:
        res.returncode = g.close()
        res.stderr_tail = list(g.tail)
        res.ended_at = time.time()
    return res


def _terminate(proc: subprocess.Popen, grace_s: float) -> None:
    """Ask the guard to kill its tree; SIGKILL the guard's group if it does not finish in time."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s + 5.0)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ----------------------------------------------------------------------------------------------
# The guard (runs as `python ablate/run/launch.py --grace S -- CMD ...`)
# ----------------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()  # fields after "(comm)": state, ppid, ...
        if len(rest) > 1 and rest[0] != "Z":
            kids.setdefault(int(rest[1]), []).append(int(name))
    return kids


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) descendants of pid, from /proc (Linux)."""
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _set_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass  # not Linux: the SIGTERM path (torchrun forwards it to its ranks) still works


def _reap(child_pid: int) -> int | None:
    """Reap every exited child (orphans re-parented to us); the child's exit code if it exited."""
    rc = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return rc
        if pid == 0:
            return rc
        if pid == child_pid:
            rc = os.waitstatus_to_exitcode(status)
            rc = 128 - rc if rc < 0 else rc  # killed by signal N → 128 + N, like a shell


def _kill_tree(child_pid: int, grace_s: float) -> None:
    me = os.getpid()
    try:
        os.kill(child_pid, signal.SIGTERM)  # torchrun forwards SIGTERM to its ranks
    except ProcessLookupError:
        pass
    end = time.time() + grace_s
    while time.time() < end and descendants(me):
        _reap(-1)
        time.sleep(0.05)
    end = time.time() + 5.0
    while time.time() < end:
        left = descendants(me)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(-1)
        time.sleep(0.02)
    _reap(-1)


def guard_main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: launch.py [--grace S] [--rm FILE ...] -- CMD ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    opts, cmd = argv[:split], argv[split + 1:]
    grace = float(opts[opts.index("--grace") + 1]) if "--grace" in opts else GUARD_GRACE_S
    remove = [opts[i + 1] for i, o in enumerate(opts) if o == "--rm"]
    try:
        return _guard(cmd, grace)
    finally:
        for path in remove:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
            except OSError:
                pass


def _guard(cmd: list[str], grace: float) -> int:
    _set_subreaper()
    stop = threading.Event()
    reason: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        reason.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    watch: list[int] = [0]  # stdin: EOF means the process that started us is gone
    while True:
        rc = _reap(child.pid)
        if rc is not None:
            child.returncode = rc  # reaped by us; keep Popen from waiting again
            if descendants(os.getpid()):  # ranks outliving torchrun
                _kill_tree(child.pid, min(grace, 2.0))
            return rc
        if watch:
            try:
                ready = select.select(watch, [], [], 0.05)[0]
                if ready and not os.read(0, 4096):
                    reason.append("parent gone")
                    stop.set()
            except OSError:
                watch.clear()
        else:
            stop.wait(0.05)
        if stop.is_set():
            _kill_tree(child.pid, grace)
            rc = _reap(child.pid)
            child.returncode = rc if rc is not None else 143
            print(f"ablate guard: killed the trainer tree ({', '.join(reason)})", file=sys.stderr)
            return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(guard_main(sys.argv[1:]))

"""One driver per experiment: a lock file in the store, kept fresh by a heartbeat.

    from ablate.store.lock import experiment_lock
    with experiment_lock(store, "smoke", command="ablate run experiments/smoke.yaml") as lock:
        ...                      # lock.lost is set when this driver no longer owns the experiment
        lock.check()             # LockLost (exit 1) once it is

`<store>/<experiment>/lock.json` names the driver: a random token, host, pid, the pid's start
time, the command, when it started and its last heartbeat. A driver that finds a live lock stops
before it changes anything (LockHeld, exit 2) with a message naming the holder and how to take
over. Writers of an experiment take it: `ablate run`, `ablate rm`, `ablate import-logs`.

Taking the lock:
  * local paths: the lock file is created with a hard link of a complete temporary file, which
    fails if the file exists (atomic; never a half-written lock); a stale lock is replaced in place
    (atomic rename of a complete file) by the one driver that holds the take-over mutex
    `lock.takeover` (itself created exclusively), after checking the lock is still the stale one;
  * object stores (S3, ...) have no create-if-absent in pyarrow: the driver PUTs its lock, waits
    `settle_s`, and reads it back; the token read back owns the experiment. Two drivers starting
    within the same instant could both read their own token; the heartbeat re-reads the lock
    before every write, so the one whose token was overwritten learns it within `heartbeat_s`
    and stops (LockLost) before it writes another run.

A lock is stale, and is taken over with a printed note, when
  * its driver ran on this machine (same boot and pid namespace) and that process is gone (the pid
    is dead, or now belongs to a process started at another time), or
  * its heartbeat is older than `stale_after_s` (a driver on another host that crashed or lost
    its network).
`--take-over` takes a lock that looks live: for a driver known to be dead whose heartbeat is
still recent, or after deciding to stop a live one (it then stops at its next heartbeat).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from ablate import __version__
from ablate.errors import AblateError, LockHeld, LockLost, StoreError

LOCK_FILE = "lock.json"
TAKEOVER_FILE = "lock.takeover"  # mutex of drivers replacing a stale lock (local stores)
TAKEOVER_STALE_S = 30.0  # a take-over mutex older than this was left by a crashed taker
HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat (and checks it still owns the lock)
STALE_AFTER_S = 600.0  # a heartbeat older than this marks a crashed driver on any host
SETTLE_S = 2.0  # object stores: wait between PUT and read-back


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat[stat.rfind(")") + 2:].split()[19]
    except (OSError, IndexError):
        return None


def _pid_space() -> str:
    """This machine's boot and pid namespace: two processes with equal values can see each other's pids."""
    parts = []
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return ":".join(parts) or socket.gethostname()


def pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _proc_start(pid)
    return start is None or now is None or now == start


@dataclass
class LockInfo:
    """What lock.json holds."""

    token: str
    host: str
    pid: int
    pid_start: str | None
    pid_space: str
    command: str
    started_at: float
    heartbeat_at: float
    ablate_version: str = __version__

    @classmethod
    def mine(cls, command: str) -> "LockInfo":
        now = time.time()
        return cls(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                   pid_start=_proc_start(os.getpid()), pid_space=_pid_space(), command=command,
                   started_at=now, heartbeat_at=now)

    @classmethod
    def parse(cls, data: bytes) -> "LockInfo | None":
        try:
            d = json.loads(data)
            return cls(token=str(d["token"]), host=str(d.get("host", "?")), pid=int(d.get("pid", -1)),
                       pid_start=d.get("pid_start"), pid_space=str(d.get("pid_space", "")),
                       command=str(d.get("command", "")), started_at=float(d.get("started_at", 0.0)),
                       heartbeat_at=float(d.get("heartbeat_at", 0.0)),
                       ablate_version=str(d.get("ablate_version", "?")))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    def stale_reason(self, now: float, stale_after_s: float) -> str | None:
        """Why this lock's driver is gone, or None if it may be alive."""
        if self.pid_space and self.pid_space == _pid_space() and not pid_alive(self.pid, self.pid_start):
            return f"its driver (pid {self.pid} on this machine) is no longer running"
        age = now - self.heartbeat_at
        if age > stale_after_s:
            return f"its last heartbeat is {age:.0f} s old (stale after {stale_after_s:.0f} s)"
        return None

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return (f"host {self.host}, pid {self.pid}, since {started}, last heartbeat "
                f"{max(0.0, now - self.heartbeat_at):.0f} s ago, command: {self.command or '?'}")


@dataclass
class ExperimentLock:
    """A held lock. `lost` is set (with `reason`) when another driver took it over or the
    heartbeat could not be written; the driver must then stop."""

    store: Any
    experiment: str
    info: LockInfo
    heartbeat_s: float = HEARTBEAT_S
    lost: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    took_over: str | None = None  # the note about a stale lock this driver replaced
    on_lost: Callable[[str], None] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return self.store.display_path(self.experiment, LOCK_FILE)

    def check(self) -> None:
        if self.lost.is_set():
            raise LockLost(self.reason)

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()
            if self.on_lost is not None:
                self.on_lost(reason)

    def heartbeat(self) -> None:
        """Re-read the lock; if it is still ours, write a fresh heartbeat; else mark it lost."""
        try:
            cur = read_lock(self.store, self.experiment)
        except StoreError as e:
            self._lose(f"the experiment lock {self.where} cannot be read: {e}")
            return
        if cur is None or cur.token != self.info.token:
            who = f"by {cur.describe(time.time())}" if cur else "(the lock file was deleted)"
            self._lose(f"the experiment lock {self.where} was taken over {who}; this driver stopped so that "
                       "only one driver writes the experiment")
            return
        self.info.heartbeat_at = time.time()
        try:
            self.store.write_bytes(self.experiment, LOCK_FILE, self.info.dump())
        except StoreError as e:
            self._lose(f"the experiment lock's heartbeat could not be written: {e}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.lost.is_set():
                return
            self.heartbeat()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"ablate-lock-{self.experiment}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self.lost.is_set():
            return
        with contextlib.suppress(AblateError):
            cur = read_lock(self.store, self.experiment)
            if cur is not None and cur.token == self.info.token:
                self.store.delete(self.experiment, LOCK_FILE)


def read_lock(store: Any, experiment: str) -> LockInfo | None:
    return _info(store.read_bytes(experiment, LOCK_FILE, max_bytes=64 * 1024))


def _info(data: bytes | None) -> LockInfo | None:
    if data is None:
        return None
    info = LockInfo.parse(data)
    if info is None:  # unreadable content: a lock all the same, of an unknown driver
        return LockInfo(token="?", host="?", pid=-1, pid_start=None, pid_space="", command="?",
                        started_at=0.0, heartbeat_at=0.0)
    return info


def held_by(store: Any, experiment: str, stale_after_s: float = STALE_AFTER_S) -> LockInfo | None:
    """The live lock of the experiment, or None if there is none or it is stale."""
    cur = read_lock(store, experiment)
    if cur is None or cur.stale_reason(time.time(), stale_after_s) is not None:
        return None
    return cur


def _held_error(store: Any, experiment: str, cur: LockInfo) -> LockHeld:
    where = store.display_path(experiment, LOCK_FILE)
    return LockHeld(
        f"experiment {experiment!r} is locked by another driver ({cur.describe(time.time())}); lock file: {where}. "
        f"Only one driver may write an experiment. Fix: wait for it to finish (`ablate status {experiment}` shows "
        f"its runs), or stop it (kill {cur.pid} on {cur.host}); if that driver is gone, run again with "
        f"--take-over. A lock whose driver is gone is taken over by itself once it is known dead "
        f"(same machine) or its heartbeat is {STALE_AFTER_S:.0f} s old")


def _replace_stale(store: Any, experiment: str, raw: bytes, me: LockInfo) -> bool:
    """Local stores: replace the lock whose bytes are `raw` by ours, under a take-over mutex
    (TAKEOVER_FILE, created exclusively) so that of several drivers taking over the same stale
    lock exactly one does, and a fresh lock is never moved or replaced. The lock file exists
    throughout (overwritten atomically), so no driver can create one in between. A mutex left by
    a taker that crashed is dropped after TAKEOVER_STALE_S. False: not taken (look again)."""
    if not store.create_exclusive(experiment, TAKEOVER_FILE, me.dump()):
        held = _info(store.read_bytes(experiment, TAKEOVER_FILE, max_bytes=64 * 1024))
        if held is not None and time.time() - held.started_at > TAKEOVER_STALE_S:
            store.delete(experiment, TAKEOVER_FILE)
        return False
    try:
        if store.read_bytes(experiment, LOCK_FILE, max_bytes=64 * 1024) != raw:
            return False  # changed since we judged it stale
        store.write_bytes(experiment, LOCK_FILE, me.dump())  # atomic replace (temp file + rename)
        return True
    finally:
        store.delete(experiment, TAKEOVER_FILE)


def acquire(store: Any, experiment: str, *, command: str = "", take_over: bool = False,
            heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
            settle_s: float | None = None, on_lost: Callable[[str], None] | None = None) -> ExperimentLock:
    """Take the experiment's lock (see the module docstring) and start its heartbeat.
    LockHeld if another live driver holds it; StoreError if the store cannot be written."""
    me = LockInfo.mine(command)
    if settle_s is None:
        settle_s = SETTLE_S
    note = None
    for attempt in range(3):  # a lock that vanishes or changes while we look is looked at again
        raw = store.read_bytes(experiment, LOCK_FILE, max_bytes=64 * 1024)
        cur = _info(raw)
        if cur is not None:
            why = cur.stale_reason(time.time(), stale_after_s)
            if why is None and not take_over:
                raise _held_error(store, experiment, cur)
            note = (f"took over the lock of {cur.describe(time.time())}: "
                    + (why or "--take-over"))
        exclusive = isinstance(store.fs, pafs.LocalFileSystem)
        created = None
        if cur is not None and exclusive:  # replace the stale lock, one taker at a time
            taken = _replace_stale(store, experiment, raw, me)
            if not taken:
                time.sleep(0.05 * (attempt + 1))  # another taker is at it, or the lock changed
                continue
            created = True
        elif cur is None:
            created = store.create_exclusive(experiment, LOCK_FILE, me.dump())
            if created is False:
                continue  # another driver was faster: look at its lock
        if created is None:  # an object store: PUT, settle, read back
            store.write_bytes(experiment, LOCK_FILE, me.dump())
            if settle_s:
                time.sleep(settle_s)
            back = read_lock(store, experiment)
            if back is None or back.token != me.token:
                if back is None:
                    continue
                raise _held_error(store, experiment, back)
        lock = ExperimentLock(store, experiment, me, heartbeat_s=heartbeat_s, took_over=note, on_lost=on_lost)
        lock.start()
        return lock
    raise LockHeld(f"experiment {experiment!r}: the lock {store.display_path(experiment, LOCK_FILE)} kept "
                   "changing while this driver tried to take it; another driver is starting; fix: try again")


@contextlib.contextmanager
def experiment_lock(store: Any, experiment: str, **kwargs: Any) -> Iterator[ExperimentLock]:
    """`acquire` ... `release` around a block."""
    lock = acquire(store, experiment, **kwargs)
    try:
        yield lock
    finally:
        lock.release()


__all__ = ["LOCK_FILE", "ExperimentLock", "LockInfo", "acquire", "experiment_lock", "held_by"]

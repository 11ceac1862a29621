"""Live progress of `ablate run`: runs done/total, failed, elapsed, ETA, runs in flight.

    with RunProgress(console, title="smoke") as p:   # driven by ablate.run.driver
        p.add(4); p.started("baseline-s0-…", "baseline", 0); p.finished("baseline-s0-…", "ok", 3.21)

On a terminal it is a rich.live display; otherwise (CI logs, pipes, `ray job` logs) one plain
line per event, so logs stay readable.
"""
from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


class NullProgress:
    """Progress sink that shows nothing (library use, tests)."""

    def add(self, n: int) -> None: ...
    def started(self, run_id: str, arm: str, seed: int) -> None: ...
    def update(self, run_id: str, metrics: dict) -> None: ...
    def finished(self, run_id: str, status: str, final_val_loss: float | None = None,
                 wall_s: float | None = None, retries_left: int = 0, error: str | None = None) -> None: ...
    def skipped(self, n: int, failed: int = 0) -> None: ...
    def note(self, text: str) -> None: ...


class RunProgress(NullProgress):
    def __init__(self, console: Console | None = None, title: str = "runs") -> None:
        self.console = console or Console(stderr=True)
        self.live_mode = self.console.is_terminal
        self.title = title
        self.total = self.done = self.failed = self.diverged = 0
        self.t0 = time.time()
        self.running: dict[str, dict] = {}
        self._bar = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                             MofNCompleteColumn(),
                             TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self._task = self._bar.add_task(title, total=0, failed=0)
        self._live: Live | None = None

    def __enter__(self) -> "RunProgress":
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None
        elif self.total:  # nothing was planned (e.g. a pre-flight error): no "finished 0/0" line
            div = f", {self.diverged} diverged" if self.diverged else ""
            self._line(f"finished: {self.done}/{self.total} runs, {self.failed} failed{div}, "
                       f"{time.time() - self.t0:.1f} s")

    # ---- events --------------------------------------------------------------------------
    def add(self, n: int) -> None:
        self.total += n
        self._bar.update(self._task, total=self.total)
        self._refresh()

    def skipped(self, n: int, failed: int = 0) -> None:
        """Of the total, n runs already have an ok row and `failed` have no attempts left (resume)."""
        if n or failed:
            self.done += n + failed
            self.failed += failed
            self._bar.update(self._task, completed=self.done, failed=self.failed)
            if n:
                self._line(f"{n} runs already in the store, skipped")
            if failed:
                self._line(f"{failed} runs failed 1 + retries times before, not run again (raise `retries` "
                           "to try more)")
            self._refresh()

    def started(self, run_id: str, arm: str, seed: int) -> None:
        self.running[run_id] = {"arm": arm, "seed": seed, "t": time.time(), "step": None, "val_loss": None}
        self._line(f"start  {run_id}")
        self._refresh()

    def update(self, run_id: str, metrics: dict) -> None:
        info = self.running.get(run_id)
        if info is None:
            return
        for k in ("step", "val_loss"):
            if metrics.get(k) is not None:
                info[k] = metrics[k]
        self._refresh()

    def note(self, text: str) -> None:
        """A line about the experiment (e.g. a stale lock taken over)."""
        self._line(text)

    def finished(self, run_id: str, status: str, final_val_loss: float | None = None,
                 wall_s: float | None = None, retries_left: int = 0, error: str | None = None) -> None:
        """A run attempt ended. A failed attempt that will be retried does not count as done; a
        diverged one (non-finite loss) is done: it is an outcome, never retried. A failed,
        cancelled or diverged attempt's line ends with the first line of its error."""
        self.running.pop(run_id, None)
        note = f"(retrying, {retries_left} attempt(s) left)" if status == "failed" and retries_left else ""
        if status == "ok":
            self.done += 1
        elif status == "diverged":
            self.done += 1
            self.diverged += 1
        elif status == "failed" and not retries_left:
            self.done += 1
            self.failed += 1
        self._bar.update(self._task, completed=self.done, failed=self.failed)
        loss = f" val_loss={final_val_loss:.4f}" if final_val_loss is not None else ""
        took = f" {wall_s:.1f}s" if wall_s is not None else ""
        why = ""
        if status != "ok" and error:
            first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
            why = f": {first[:300]}" + ("..." if len(first) > 300 else "")
        self._line(f"{status:<6} {run_id}{loss}{took}{' ' + note if note else ''}  "
                   f"[{self.done}/{self.total}, {self.failed} failed]{why}")
        self._refresh()

    # ---- rendering -----------------------------------------------------------------------
    def _line(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print(f"[{time.time() - self.t0:7.1f}s] {text}", markup=False, highlight=False,
                               soft_wrap=True)

    def _render(self) -> Group:
        table = Table(box=None, show_header=bool(self.running), pad_edge=False)
        for col in ("running", "step", "val_loss", "elapsed"):
            table.add_column(col)
        now = time.time()
        for run_id, info in list(self.running.items())[:12]:
            loss = f"{info['val_loss']:.4f}" if info["val_loss"] is not None else "-"
            table.add_row(Text(run_id), str(info["step"] if info["step"] is not None else "-"), loss,
                          f"{now - info['t']:.0f}s")
        return Group(self._bar.get_renderable(), table)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

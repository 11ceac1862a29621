"""CLI commands for analysis: `ablate table`, `ablate report`, `ablate import-logs`.

    ablate table EXPERIMENT [--format rich|md|csv|json] [--store URI] [--baseline ARM] [--target LOSS]
    ablate report EXPERIMENT [--store URI] [--baseline ARM] [--target LOSS]
    ablate import-logs PATH... --experiment NAME --arm NAME [--store URI]

`register(app)` adds them to the main typer app (ablate/cli.py). Exit codes (ablate.errors.EXIT_CODES):
0 success, 1 runtime failure (including any log file that could not be imported), 2 bad input
(a bad experiment or arm name, an unknown format, the experiment locked by a running driver).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ablate.errors import EXIT_BAD_INPUT, EXIT_FAILED, AblateError

StoreOpt = Annotated[str, typer.Option("--store", help="store path or URI (s3://bucket/prefix, ...)")]
BaselineOpt = Annotated[Optional[str], typer.Option("--baseline", help="baseline arm (default: the spec's)")]
TargetOpt = Annotated[Optional[float], typer.Option("--target", help="target loss (default: the spec's target_loss)")]


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(code=getattr(e, "exit_code", EXIT_BAD_INPUT if isinstance(e, ValueError) else EXIT_FAILED))


def _store(uri: str):
    from ablate.errors import SpecError, StoreError
    from ablate.store import Store

    try:
        return Store(uri)
    except StoreError as e:  # a bad URI is bad input
        raise SpecError(str(e)) from None


def _check_name(experiment: str) -> None:
    from ablate.names import check_experiment

    try:
        check_experiment(experiment)
    except AblateError as e:
        raise _fail(e) from None


def table_cmd(experiment: Annotated[str, typer.Argument(help="experiment name (store folder)")],
              fmt: Annotated[str, typer.Option("--format", "-f", help="rich, md, csv or json")] = "rich",
              store: StoreOpt = "results", baseline: BaselineOpt = None, target: TargetOpt = None) -> None:
    """Print the results table in the speedrun record layout."""
    from ablate import tables

    _check_name(experiment)
    if fmt not in tables.FORMATS:
        typer.echo(f"error: --format {fmt!r} is not one of {', '.join(tables.FORMATS)}; fix: --format md", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT)
    try:
        out = tables.render_table(_store(store), experiment, fmt, baseline, target)
    except (AblateError, ValueError) as e:
        raise _fail(e) from None
    if fmt == "rich":
        from rich.console import Console

        console = Console()
        if not console.is_terminal:      # CI logs, pipes: wide enough that the table is not truncated
            console = Console(width=max(console.width, 200))
        console.print(out)
    else:
        sys.stdout.write(out)


def report_cmd(experiment: Annotated[str, typer.Argument(help="experiment name (store folder)")],
               store: StoreOpt = "results", baseline: BaselineOpt = None, target: TargetOpt = None) -> None:
    """Write report.md and PNG figures into the experiment's folder."""
    from ablate.report import write_report

    _check_name(experiment)
    try:
        written = write_report(_store(store), experiment, baseline, target)
    except (AblateError, ValueError) as e:
        raise _fail(e) from None
    for name, path in written.items():
        typer.echo(f"wrote {path}")


def import_logs_cmd(paths: Annotated[list[Path], typer.Argument(help="log files or folders of *.txt/*.log")],
                    experiment: Annotated[str, typer.Option("--experiment", help="experiment to import into")],
                    arm: Annotated[str, typer.Option("--arm", help="arm the runs belong to")],
                    store: StoreOpt = "results") -> None:
    """Import speedrun-style text logs as runs (source=import)."""
    from ablate.importlogs import import_logs
    from ablate.lock import experiment_lock
    from ablate.names import ARM_RULE, NAME_RULE, is_arm, is_experiment

    if not is_experiment(experiment):
        typer.echo(f"error: --experiment {experiment!r} must match {NAME_RULE} (it names the store "
                   "folder); fix: e.g. --experiment upstream-1211", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT)
    if not is_arm(arm):
        typer.echo(f"error: --arm {arm!r} must match {ARM_RULE}; fix: e.g. --arm record", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT)
    try:
        st = _store(store)
        with experiment_lock(st, experiment, command=f"ablate import-logs --experiment {experiment}"):
            results = import_logs(st, list(paths), experiment, arm)
    except AblateError as e:
        raise _fail(e) from None
    if not results:
        typer.echo("error: no log files found in the given paths (folders contribute *.txt and *.log)", err=True)
        raise typer.Exit(code=EXIT_FAILED)
    for r in results:
        line = f"{r.path}: {r.note}" + (f" [{r.run_id}, seed {r.seed}]" if r.seed is not None else "")
        typer.echo(("error: " if r.error else "") + line, err=r.error)
    bad = sum(r.error for r in results)
    typer.echo(f"{len(results) - bad} of {len(results)} files imported or already present into "
               f"{experiment!r} (arm {arm!r}); {bad} failed")
    if bad:
        raise typer.Exit(code=EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add `table`, `report` and `import-logs` to the ablate CLI app."""
    app.command("table")(table_cmd)
    app.command("report")(report_cmd)
    app.command("import-logs")(import_logs_cmd)

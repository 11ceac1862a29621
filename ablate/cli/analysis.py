"""CLI commands for analysis: `ablate table`, `ablate report`, `ablate import-logs`.

    ablate table EXPERIMENT [--format rich|md|csv|json] [--store URI] [--baseline ARM] [--target LOSS]
                            [--all-configs]
    ablate report EXPERIMENT [--store URI] [--baseline ARM] [--target LOSS]
    ablate import-logs PATH... --experiment NAME --arm NAME [--store URI] [--target LOSS]

`register(app)` adds them to the main typer app (ablate/cli/main.py). `table` and `report` read the
experiment from the store once (ablate.analysis.tables.read_experiment) and pass it down; a stored spec that
no longer validates gives a note on stderr, not an error. Exit codes (ablate.errors.EXIT_CODES):
0 success, 1 runtime failure (including any log file that could not be imported), 2 bad input
(a bad experiment or arm name, an unknown format, the experiment locked by a running driver).
"""
from __future__ import annotations

import math
import os
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
    from ablate.store.parquet import Store

    try:
        return Store(uri)
    except StoreError as e:  # a bad URI is bad input
        raise SpecError(str(e)) from None


def _read(store: str, experiment: str):
    """The experiment, read once; a note on stderr when its stored spec no longer validates."""
    from ablate.analysis.tables import read_experiment

    exp = read_experiment(_store(store), experiment)
    if exp.stored.note():
        typer.echo(f"note: {exp.stored.note()}", err=True)
    return exp


def _check_name(experiment: str) -> None:
    from ablate.names import check_experiment

    try:
        check_experiment(experiment)
    except AblateError as e:
        raise _fail(e) from None


def table_cmd(experiment: Annotated[str, typer.Argument(help="experiment name (store folder)")],
              fmt: Annotated[str, typer.Option("--format", "-f", help="rich, md, csv or json")] = "rich",
              store: StoreOpt = "results", baseline: BaselineOpt = None, target: TargetOpt = None,
              all_configs: Annotated[bool, typer.Option(
                  "--all-configs", help="show each config of an arm as its own row (arm@config_hash); by "
                  "default an arm counts only its current config's runs")] = False) -> None:
    """Print the results table in the speedrun record layout.

    Each arm counts only the runs of its current config (the stored spec's config hash; for arms
    not in the spec, e.g. imported logs, the config of the arm's latest run); the table says how
    many older runs it left out."""
    from ablate.cli.results import render_table
    from ablate.analysis.tables import FORMATS

    _check_name(experiment)
    if fmt not in FORMATS:
        typer.echo(f"error: --format {fmt!r} is not one of {', '.join(FORMATS)}; fix: --format md", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT)
    try:
        out = render_table(_read(store, experiment), fmt, baseline, target, all_configs)
    except (AblateError, ValueError) as e:
        raise _fail(e) from None
    if fmt == "rich":
        from rich.console import Console

        console = Console()              # the table fits its width (ablate.analysis.tables.RichTable)
        if not console.is_terminal and "COLUMNS" not in os.environ:   # CI logs, pipes: the wide layout
            console = Console(width=max(console.width, 200))
        console.print(out)
    else:
        sys.stdout.write(out)


def report_cmd(experiment: Annotated[str, typer.Argument(help="experiment name (store folder)")],
               store: StoreOpt = "results", baseline: BaselineOpt = None, target: TargetOpt = None) -> None:
    """Write report.md and PNG figures into the experiment's folder."""
    from ablate.cli.results import write_report

    _check_name(experiment)
    try:
        written = write_report(_read(store, experiment), baseline, target)
    except (AblateError, ValueError) as e:
        raise _fail(e) from None
    for name, path in written.items():
        typer.echo(f"wrote {path}")


def import_logs_cmd(paths: Annotated[list[Path], typer.Argument(help="log files or folders of *.txt/*.log")],
                    experiment: Annotated[str, typer.Option("--experiment", help="experiment to import into")],
                    arm: Annotated[str, typer.Option("--arm", help="arm the runs belong to")],
                    store: StoreOpt = "results",
                    target: Annotated[Optional[float], typer.Option(
                        "--target", help="target loss stored with the experiment, so `ablate table` shows "
                        "p(<target) without flags (e.g. 3.28)")] = None) -> None:
    """Import speedrun-style text logs as runs (source=import)."""
    from ablate.store.importlogs import import_logs
    from ablate.store.lock import experiment_lock
    from ablate.names import ARM_RULE, NAME_RULE, is_arm, is_experiment

    if not is_experiment(experiment):
        typer.echo(f"error: --experiment {experiment!r} must match {NAME_RULE} (it names the store "
                   "folder); fix: e.g. --experiment upstream-1211", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT)
    if not is_arm(arm):
        typer.echo(f"error: --arm {arm!r} must match {ARM_RULE}; fix: e.g. --arm record", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT)
    if target is not None and not math.isfinite(target):
        typer.echo(f"error: --target {target} is not a finite loss; fix: e.g. --target 3.28", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT)
    try:
        st = _store(store)
        with experiment_lock(st, experiment, command=f"ablate import-logs --experiment {experiment}"):
            results = import_logs(st, list(paths), experiment, arm)
            if target is not None and any(not r.error for r in results):
                from ablate.spec.model import read_stored_spec
                from ablate.analysis.tables import store_target

                typer.echo(f"target loss {target:g} stored in {store_target(st, experiment, target)}")
                spec_target = read_stored_spec(st, experiment).analysis.target_loss
                if spec_target is not None and spec_target != target:
                    typer.echo(f"note: the experiment's spec.yaml sets target_loss {spec_target}, which wins "
                               "over the stored one; pass --target to `ablate table` to override both")
        configs = _arm_configs(st, experiment, arm)
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
    if len(configs) > 1:
        typer.echo(f"note: arm {arm!r} now holds logs of {len(configs)} different training scripts (config "
                   f"hashes: {', '.join(f'{h} ({n} runs)' for h, n in configs)}); `ablate table` compares only "
                   f"the current one (the latest imported, {configs[-1][0]}, unless the experiment's spec defines "
                   "this arm); `--all-configs` shows each as a row, or import each script's logs as its own --arm")
    if bad:
        raise typer.Exit(code=EXIT_FAILED)


def _arm_configs(store, experiment: str, arm: str) -> list[tuple[str, int]]:
    """(config_hash, runs) of an arm, the current (latest) config last."""
    runs = store.runs(experiment)
    runs = runs[runs["arm"] == arm] if len(runs) else runs
    if runs.empty:
        return []
    counts = runs.groupby("config_hash")["order"].agg(["size", "max"]).sort_values("max")
    return [(str(h), int(n)) for h, n in zip(counts.index, counts["size"])]


def register(app: typer.Typer) -> None:
    """Add `table`, `report` and `import-logs` to the ablate CLI app."""
    app.command("table")(table_cmd)
    app.command("report")(report_cmd)
    app.command("import-logs")(import_logs_cmd)

"""An experiment's results table, plain or search: what `ablate table` prints, what `ablate run`
prints when it ends, and the table of report.md (`write_report`).

    ablate table EXPERIMENT [--format rich|md|csv|json] [--store URI] [--baseline ARM] [--target LOSS]

    from ablate.cli.results import render_table
    from ablate.analysis.tables import read_experiment
    print(render_table(read_experiment(Store("results"), "smoke"), "md"))

The caller reads the experiment once (ablate.analysis.tables.read_experiment: runs, spec copy parsed by
the model, settings.json) and passes it down. A search experiment (a `search:` block in its spec)
gets ablate.search.report's trial listing and its confirmation's table; any other experiment the
significance table of ablate.analysis.tables. This module sits above both, so neither imports the other's
caller.
"""
from __future__ import annotations

from typing import Any

from ablate.analysis import tables
from ablate.search.report import is_search_experiment, search_table


def render_table(exp: tables.Experiment, fmt: str = "rich", baseline: str | None = None,
                 target: float | None = None, all_configs: bool = False) -> Any:
    """The experiment's table: a rich renderable for fmt="rich", a str for "md", "csv" and "json"."""
    if fmt not in tables.FORMATS:
        raise tables.AnalysisError(f"format={fmt!r} is not one of {', '.join(tables.FORMATS)}; fix: --format md")
    if is_search_experiment(exp):
        return search_table(exp, fmt, baseline, target, all_configs=all_configs)
    df, settings = tables.analyse(exp, baseline, target, all_configs)
    return tables.format_table(df, settings, fmt, exp.name)


def print_table(exp: tables.Experiment, console: Any = None, baseline: str | None = None,
                target: float | None = None, all_configs: bool = False) -> None:
    """Print the rich table to `console` (default: a new rich Console on stdout)."""
    if console is None:
        from rich.console import Console
        console = Console()
    console.print(render_table(exp, "rich", baseline, target, all_configs))


def write_report(exp: tables.Experiment, baseline: str | None = None, target: float | None = None) -> dict[str, str]:
    """`ablate report`: report.md and the figures (ablate.analysis.report); a search experiment's report
    holds its trial listing and confirmation table."""
    from ablate.analysis import report

    table = search_table(exp, "md", baseline, target) if is_search_experiment(exp) else None
    return report.write_report(exp, baseline, target, table=table)

"""The `ablate` command line (typer + rich).

    ablate run experiments/smoke.yaml [--address HOST:PORT] [--store URI] [--autoscale] [--dry-run]
    ablate validate experiments/*.yaml
    ablate status smoke [--store URI]
    python -m ablate ...                  # same thing without the console script

Exit codes: 0 ok; 2 bad input (any spec error, unreadable file, bad store URI); 1 runtime failure
(e.g. runs still failed after their retries; everything is written and the table printed first);
130 interrupted (SIGINT/SIGTERM; finished runs are kept, run again to resume).
`table`, `report` and `import-logs` come from ablate.cli_analysis when it is installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ablate.errors import AblateError, Interrupted, SpecError, StoreError
from ablate.spec import Spec, load_spec

app = typer.Typer(name="ablate", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ray-orchestrated ablations of the NorMuon speedrun trainer.")


def _console(stderr: bool = False) -> Console:
    """Rich console; off a terminal (CI logs, `ray job logs`) wide enough that tables do not truncate."""
    c = Console(stderr=stderr)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, width=max(c.width, 160))
    return c


out = _console()
err = _console(stderr=True)

STORE_OPT = typer.Option("results", "--store", help="Result store: local path or URI (s3://bucket/prefix, ...).")


def _fail(e: AblateError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(e.exit_code)


def _open_store(uri: str):
    from ablate.store import Store

    try:
        return Store(uri)
    except StoreError as e:
        raise _fail(SpecError(str(e))) from None


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
@app.command()
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Experiment spec (YAML)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, "
                                          "else an embedded local cluster)."),
    store_uri: str = STORE_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the run matrix and resource plan; start nothing."),
    autoscale: bool = typer.Option(False, "--autoscale", help="The cluster's autoscaler adds nodes (cluster.yaml): "
                                   "wait for a node that can hold a run instead of failing, and do not cap "
                                   "concurrency (docs/cluster.md)."),
) -> None:
    """Run every (arm, seed) of SPEC on Ray, write results to the store, print the table."""
    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        raise _fail(e) from None
    store = _open_store(store_uri)
    search = spec.search is not None and importlib.util.find_spec("ablate.search") is not None
    if dry_run:
        if search:
            from ablate.search import describe_search

            try:
                out.print(describe_search(spec, store))
            except AblateError as e:
                raise _fail(e) from None
        else:
            _print_plan(spec, store)
        raise typer.Exit(0)

    if autoscale and not (address or os.environ.get("RAY_ADDRESS")):
        raise _fail(SpecError("--autoscale needs a cluster whose autoscaler can add nodes: pass --address "
                              "(or run inside `ray job submit`, which sets RAY_ADDRESS); the embedded local "
                              "cluster never grows, so runs would wait forever"))
    from ablate.orchestrate import LaunchOptions, run_experiment  # imports Ray: only when running
    from ablate.progress import RunProgress

    options = LaunchOptions(autoscale=autoscale)

    results, code = [], 0
    try:
        with RunProgress(err, title=spec.name) as progress:
            if search:  # Optuna search, then its confirmation (ablate.search)
                from ablate.search import run_search

                outcome = run_search(spec, store, address, progress=progress, options=options)
                results = outcome.confirmation  # a failed search seed is a search outcome, not an error
            else:
                results = run_experiment(spec, store, address, progress=progress, options=options)
    except Interrupted as e:
        err.print(f"[yellow]{e}[/]", soft_wrap=True)
        code = e.exit_code
    except KeyboardInterrupt:  # outside a Tune run (starting Ray, between batches)
        err.print("[yellow]interrupted; run the same spec again to resume[/]")
        code = Interrupted.exit_code
    except SpecError as e:  # e.g. no node can hold one run
        raise _fail(e) from None
    except AblateError as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        code = e.exit_code
    print_results_table(store, spec)
    diverged = [r for r in results if r.status == "diverged"]
    if diverged:  # an outcome of the config (counted in the table), not a failure to retry
        err.print(f"[yellow]{len(diverged)} of {len(results)} runs diverged (non-finite loss; not retried; "
                  "counted in the table):[/] " + escape(", ".join(r.run_id or r.request.arm for r in diverged)),
                  markup=True, highlight=False, soft_wrap=True)
    failed = [r for r in results if not r.ok and r.status != "diverged"]
    if failed:
        err.print(f"[bold red]{len(failed)} of {len(results)} runs have no ok result after "
                  f"{spec.retries} retries:[/]")
        for r in failed:
            text = (r.row or {}).get("error")
            first = (text if isinstance(text, str) and text.strip() else r.status).strip().splitlines()[0]
            err.print(f"  {r.run_id or r.request.arm}: {first}", markup=False, soft_wrap=True)
        code = code or 1
    raise typer.Exit(code)


def _print_plan(spec: Spec, store) -> None:
    from ablate.matrix import expand, plan, resource_plan

    reqs = expand(spec)
    try:
        planned = plan(reqs, store.runs(spec.name), spec.retries)
        where = store.display_path(spec.name)
    except StoreError as e:
        planned, where = None, f"unreadable ({e})"
    seeds = (f"sequential seeds: {spec.seeds.min} first, up to {spec.seeds.max}"  # type: ignore[union-attr]
             if spec.sequential else f"{len(spec.max_seeds)} seeds")
    out.print(f"[bold]{spec.name}[/]: {spec.trainer_label}, {len(spec.arms)} arms × {seeds}, "
              f"retries {spec.retries}, baseline {spec.baseline!r}", soft_wrap=True)
    table = Table("order", "arm", "seed", "round", "config_hash", "state", title="run matrix (launch order)")
    table.add_column("overrides", overflow="fold")
    for i, req in enumerate(reqs):
        state = "todo" if planned is None else planned[i].state
        ov = {k: v for k, v in spec.arms[req.arm].items()} if spec.arms[req.arm] else {}
        table.add_row(str(i), req.arm, str(req.seed), str(req.round), req.config_hash, state,
                      json.dumps(ov, separators=(",", ":")) if ov else "-")
    out.print(table)
    rp = resource_plan(spec)
    dev = f"{rp['ranks_per_run']} GPU rank(s)" if rp["device"] == "cuda" else f"{rp['ranks_per_run']} CPU rank(s) (gloo)"
    node = " (+ gpu_node: 1 where the cluster advertises it)" if spec.resources.gpus_per_run == 8 else ""
    cache = spec.resources.compile_cache_dir or "torch defaults"
    out.print(f"per run: {dev}, Ray bundle {{CPU: {rp['bundle']['CPU']:g}, GPU: {rp['bundle']['GPU']:g}}}{node}, "
              f"OMP_NUM_THREADS={rp['omp_num_threads']}, timeout {rp['timeout_s'] or 'none'}, "
              f"compile cache {cache}, "
              + ("long-lived workers (reuse_workers)" if spec.resources.reuse_workers else "a fresh process per run"),
              soft_wrap=True)
    out.print(f"runs: {len(reqs)} now, at most {rp['max_runs']} (+ retries); concurrency = whole bundles that "
              f"fit on the cluster's nodes", soft_wrap=True)
    from ablate.script import describe

    for line in describe(spec):  # script arms (ablate.script): how they run, each arm's code
        out.print(line, soft_wrap=True, markup=False, highlight=False)
    out.print(f"store: {where}", soft_wrap=True)


def print_results_table(store, spec: Spec) -> None:
    """The analysis table (ablate.tables), or a minimal per-arm summary if that is not installed."""
    try:
        if store.runs(spec.name).empty:
            return
    except StoreError as e:
        err.print(f"[yellow]table: {e}[/]", soft_wrap=True)
        return
    if importlib.util.find_spec("ablate.tables") is not None:
        from ablate.tables import print_table

        try:
            print_table(store, spec.name, out)
            return
        except AblateError as e:
            err.print(f"[yellow]table: {e}[/]", soft_wrap=True)
            return
    _minimal_table(store, spec)


def _minimal_table(store, spec: Spec) -> None:
    df = store.runs(spec.name)
    table = Table("arm", "n ok", "failed", "val loss mean", "std", "train time s mean", title=f"{spec.name}")
    for arm in spec.arms:
        sub = df[(df["arm"] == arm) & (df["config_hash"] == spec.config_hash(arm))] if len(df) else df
        ok = sub[sub["status"] == "ok"] if len(sub) else sub
        loss = ok["final_val_loss"] if len(ok) else None
        fmt = lambda v: "-" if v is None or v != v else f"{v:.4f}"  # noqa: E731
        table.add_row(arm, str(len(ok)), str(int((sub["status"] == "failed").sum()) if len(sub) else 0),
                      fmt(loss.mean() if loss is not None else None),
                      fmt(loss.std() if loss is not None and len(loss) > 1 else None),
                      fmt(ok["train_time_ms"].mean() / 1000 if len(ok) else None))
    out.print(table)


# --------------------------------------------------------------------------------------------
# validate, status
# --------------------------------------------------------------------------------------------
@app.command()
def validate(specs: List[Path] = typer.Argument(..., metavar="SPEC...", help="Spec files to check.")) -> None:
    """Check spec files (keys, types, every trainer override; scripts exist, patches apply) without running anything."""
    bad = 0
    for path in specs:
        try:
            spec = load_spec(path)
        except SpecError as e:
            bad += 1
            err.print(f"[bold red]invalid[/] {e}", soft_wrap=True, highlight=False)
            continue
        n = len(spec.arms) * len(spec.max_seeds)
        out.print(f"[green]ok[/] {path}: {spec.name}, {spec.trainer_label}, {len(spec.arms)} arms, "
                  f"{'up to ' if spec.sequential else ''}{n} runs, "
                  f"gpus_per_run {spec.resources.gpus_per_run}", soft_wrap=True, highlight=False)
    raise typer.Exit(2 if bad else 0)


@app.command()
def status(experiment: str = typer.Argument(..., help="Experiment name (store folder)."),
           store_uri: str = STORE_OPT) -> None:
    """Counts by arm and status, runs in flight, and runs still missing."""
    store = _open_store(store_uri)
    try:
        df = store.runs(experiment)
        inflight = store.inflight(experiment)
        spec_text = store.read_bytes(experiment, "spec.yaml")
    except StoreError as e:
        raise _fail(e) from None
    if not len(df) and spec_text is None:
        known = ", ".join(store.experiments()) or "none"
        raise _fail(SpecError(f"experiment={experiment!r} is not in store {store.uri!r} (experiments: {known}); "
                              "fix: check the name or pass --store"))
    spec = None
    if spec_text is not None:
        from ablate.script import read_stored
        from ablate.spec import parse_spec_text

        try:  # script arms: their identity at the last run (script_arms.json), not today's files
            spec = parse_spec_text(spec_text.decode(), source=store.display_path(experiment, "spec.yaml"),
                                   stored_scripts=read_stored(store, experiment))
        except SpecError as e:
            err.print(f"[yellow]stored spec no longer validates ({e}); 'missing' not shown[/]", soft_wrap=True)
    missing_by_arm, search_note = {}, None
    if spec is not None:
        from ablate.matrix import missing_runs

        try:
            missing_by_arm, search_note = missing_runs(spec, df)
        except (SpecError, ValueError) as e:
            err.print(f"[yellow]cannot plan the stored spec ({escape(str(e))}); 'missing' not shown[/]",
                      soft_wrap=True)
    arms = list(spec.arms) if spec else sorted(set(df["arm"]))
    arms += [a for a in missing_by_arm if a not in arms]
    arms += sorted(set(df["arm"]) - set(arms)) if len(df) else []
    flying = {}
    for m in inflight:
        flying[m.get("arm")] = flying.get(m.get("arm"), 0) + 1
    statuses = ("ok", "diverged", "failed", "cancelled")
    table = Table("arm", *statuses, "in flight", "missing", title=f"{experiment} ({store.uri})")
    totals = [0] * (len(statuses) + 2)
    for arm in arms:
        sub = df[df["arm"] == arm] if len(df) else df
        counts = [int((sub["status"] == s).sum()) if len(sub) else 0 for s in statuses]
        missing = "-"
        if arm in missing_by_arm:
            missing = str(missing_by_arm[arm])
            totals[-1] += missing_by_arm[arm]
        row = counts + [flying.get(arm, 0)]
        totals[:-1] = [t + v for t, v in zip(totals[:-1], row)]
        table.add_row(arm, *map(str, row), missing)
    table.add_row("[bold]total", *map(str, totals))
    out.print(table)
    if search_note:
        out.print(search_note, markup=False, highlight=False, soft_wrap=True)
    for m in inflight:
        out.print(f"in flight: {m.get('run_id')} (driver {m.get('driver_host')} pid {m.get('driver_pid')})",
                  soft_wrap=True, highlight=False)


# `table`, `report`, `import-logs` (statistics work) when that module exists.
if importlib.util.find_spec("ablate.cli_analysis") is not None:
    from ablate import cli_analysis

    cli_analysis.register(app)

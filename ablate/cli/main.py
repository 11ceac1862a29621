"""The `ablate` command line (typer + rich).

    ablate run experiments/smoke.yaml [--address HOST:PORT] [--store URI] [--autoscale] [--dry-run] [--take-over]
    ablate validate experiments/*.yaml
    ablate status smoke [--store URI]
    ablate rm smoke [--arm A]... [--run ID]... [--yes] [--store URI]
    ablate --version
    python -m ablate ...                  # same thing without the console script

Exit codes (every command; the table lives in ablate.errors.EXIT_CODES): 0 ok; 1 runs failed
or a runtime error (everything is written and the table printed first); 2 bad input, refused
before anything ran or changed (spec, argument, name, store URI, experiment locked by another
driver; typer's own usage errors are 2 too); 130 interrupted (finished runs are kept, run again
to resume; typer turns Ctrl-C in any command into 130).
`table`, `report` and `import-logs` come from ablate.cli.analysis when it is installed.

Every value that reaches the terminal is printed as plain text (rich `Text`, never markup), so a
name such as '[/]' or a hint such as `[a-z0-9]*` prints as written.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ablate import __version__
from ablate.errors import (
    EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, AblateError, Interrupted, SpecError, StoreError,
    exit_codes_text,
)
from ablate.spec.model import Spec, load_spec

EPILOG = "Exit codes (every command):\n\n" + "\n\n".join(
    line.strip() for line in exit_codes_text().splitlines())

app = typer.Typer(name="ablate", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  epilog=EPILOG,
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
TAKE_OVER_OPT = typer.Option(False, "--take-over", help="Take the experiment's lock from a driver that looks "
                             "alive (use it when that driver is known to be gone; a live one stops at its next "
                             "heartbeat). A stale lock is taken over without it.")


def _say(console: Console, label: str, style: str, text: object) -> None:
    """`label` in colour, then `text` exactly as it is (no markup, no highlighting)."""
    console.print(Text.assemble((label, style), " ", str(text)), soft_wrap=True)


def _fail(e: AblateError) -> typer.Exit:
    _say(err, "error:", "bold red", e)
    return typer.Exit(e.exit_code)


def _open_store(uri: str):
    from ablate.store.parquet import Store

    try:
        return Store(uri)
    except StoreError as e:
        raise _fail(SpecError(str(e))) from None


def _check_name(experiment: str) -> None:
    from ablate.names import check_experiment

    try:
        check_experiment(experiment)
    except SpecError as e:
        raise _fail(e) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ablate {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Ray-orchestrated ablations of the NorMuon speedrun trainer."""


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
@app.command()
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Experiment spec (YAML)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, "
                                          "else an embedded local cluster)."),
    store_uri: str = STORE_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the run matrix (summarised per arm when large) "
                                 "and resource plan; start nothing."),
    autoscale: bool = typer.Option(False, "--autoscale", help="The cluster's autoscaler adds nodes (cluster.yaml): "
                                   "wait for a node that can hold a run instead of failing, and do not cap "
                                   "concurrency (docs/cluster.md)."),
    take_over: bool = TAKE_OVER_OPT,
) -> None:
    """Run every (arm, seed) of SPEC on Ray, write results to the store, print the table.

    One driver per experiment: the run holds a lock in the store (docs/store.md, "Lock")."""
    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        raise _fail(e) from None
    store = _open_store(store_uri)
    search = spec.search is not None
    if dry_run:
        if search:
            from ablate.search.driver import describe_search

            try:
                out.print(describe_search(spec, store))
            except AblateError as e:
                raise _fail(e) from None
        else:
            _print_plan(spec, store)
        raise typer.Exit(EXIT_OK)

    if autoscale and not (address or os.environ.get("RAY_ADDRESS")):
        raise _fail(SpecError("--autoscale needs a cluster whose autoscaler can add nodes: pass --address "
                              "(or run inside `ray job submit`, which sets RAY_ADDRESS); the embedded local "
                              "cluster never grows, so runs would wait forever"))
    from ablate.store.lock import acquire
    from ablate.run.driver import LaunchOptions, run_experiment  # imports Ray: only when running
    from ablate.run.progress import RunProgress

    options = LaunchOptions(autoscale=autoscale)
    command = "ablate " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["run"] else f"ablate run {spec_path}"
    try:  # one driver per experiment: before anything is written
        lock = acquire(store, spec.name, command=command, take_over=take_over)
    except AblateError as e:  # LockHeld (exit 2) or the store cannot be written (exit 1)
        raise _fail(e) from None
    results, code = [], EXIT_OK
    try:
        if lock.took_over:
            _say(err, "note:", "yellow", lock.took_over)
        with RunProgress(err, title=spec.name) as progress:
            if search:  # Optuna search, then its confirmation (ablate.search.driver)
                from ablate.search.driver import run_search

                outcome = run_search(spec, store, address, progress=progress, options=options, lock=lock)
                results = outcome.confirmation  # a failed search seed is a search outcome, not an error
            else:
                results = run_experiment(spec, store, address, progress=progress, options=options, lock=lock)
    except Interrupted as e:
        _say(err, "interrupted:", "yellow", str(e).removeprefix("interrupted: "))
        code = e.exit_code
    except KeyboardInterrupt:  # outside a Tune run (starting Ray, between seed rounds or search waves)
        _say(err, "interrupted:", "yellow", "run the same spec again to resume")
        code = EXIT_INTERRUPTED
    except SpecError as e:  # e.g. no node can hold one run
        raise _fail(e) from None
    except AblateError as e:
        _say(err, "error:", "bold red", e)
        code = e.exit_code
    finally:
        lock.release()
    print_results_table(store, spec)
    diverged = [r for r in results if r.status == "diverged"]
    if diverged:  # an outcome of the config (counted in the table), not a failure to retry
        _say(err, f"{len(diverged)} of {len(results)} runs diverged (non-finite loss; not retried; counted in the "
             "table):", "yellow", ", ".join(r.run_id or r.request.arm for r in diverged))
    failed = [r for r in results if not r.ok and r.status != "diverged"]
    if failed:
        _say(err, f"{len(failed)} of {len(results)} runs have no ok result after {spec.retries} retries:",
             "bold red", "")
        for r in failed:
            text = (r.row or {}).get("error")
            first = (text if isinstance(text, str) and text.strip() else r.status).strip().splitlines()[0]
            err.print(Text(f"  {r.run_id or r.request.arm}: {first}"), soft_wrap=True)
        code = code or EXIT_FAILED
    raise typer.Exit(code)


PLAN_ROWS = 40  # a larger matrix is summarised per arm by --dry-run


def _print_plan(spec: Spec, store) -> None:
    from ablate.spec.matrix import expand, plan, resource_plan

    reqs = expand(spec)
    try:
        planned = plan(reqs, store.runs(spec.name), spec.retries)
        where = store.display_path(spec.name)
    except StoreError as e:
        planned, where = None, f"unreadable ({e})"
    seeds = (f"sequential seeds: {spec.seeds.min} first, up to {spec.seeds.max}"  # type: ignore[union-attr]
             if spec.sequential else f"{len(spec.max_seeds)} seeds")
    out.print(Text.assemble((spec.name, "bold"), f": {spec.trainer_label}, {len(spec.arms)} arms × {seeds}, "
                            f"retries {spec.retries}, baseline {spec.baseline!r}"), soft_wrap=True)
    states = [("todo" if planned is None else p.state) for p in (planned or reqs)]

    def overrides(arm: str) -> str:
        ov = spec.arms[arm]
        return json.dumps(ov, separators=(",", ":"), default=str) if ov else "-"

    if len(reqs) <= PLAN_ROWS:
        table = Table("order", "arm", "seed", "round", "config_hash", "state", title="run matrix (launch order)")
        table.add_column("overrides", overflow="fold")
        for i, req in enumerate(reqs):
            table.add_row(*(Text(str(v)) for v in (i, req.arm, req.seed, req.round, req.config_hash, states[i],
                                                    overrides(req.arm))))
    else:  # one row per arm: a matrix of thousands of runs stays readable
        table = Table("arm", "runs", "seeds", "done", "todo", "no attempts left", "config_hash",
                      title=f"run matrix: {len(reqs)} runs, summarised per arm (launch order: seed-major, "
                            "arms interleaved)")
        table.add_column("overrides", overflow="fold")
        for arm in spec.arms:
            idx = [i for i, r in enumerate(reqs) if r.arm == arm]
            arm_seeds = [reqs[i].seed for i in idx]
            span = (f"{arm_seeds[0]}..{arm_seeds[-1]}" if arm_seeds == list(range(arm_seeds[0], arm_seeds[-1] + 1))
                    else f"{len(arm_seeds)} listed")
            count = {s: sum(states[i] == s for i in idx) for s in ("done", "todo", "exhausted")}
            table.add_row(*(Text(str(v)) for v in (arm, len(idx), span, count["done"], count["todo"],
                                                    count["exhausted"], reqs[idx[0]].config_hash, overrides(arm))))
    out.print(table)
    rp = resource_plan(spec)
    dev = f"{rp['ranks_per_run']} GPU rank(s)" if rp["device"] == "cuda" else f"{rp['ranks_per_run']} CPU rank(s) (gloo)"
    node = " (+ gpu_node: 1 where the cluster advertises it)" if spec.resources.gpus_per_run == 8 else ""
    cache = spec.resources.compile_cache_dir or "torch defaults"
    lines = [f"per run: {dev}, Ray bundle {{CPU: {rp['bundle']['CPU']:g}, GPU: {rp['bundle']['GPU']:g}}}{node}, "
             f"OMP_NUM_THREADS={rp['omp_num_threads']}, timeout {rp['timeout_s'] or 'none'}, compile cache {cache}, "
             + ("long-lived workers (reuse_workers)" if spec.resources.reuse_workers else "a fresh process per run"),
             f"runs: {len(reqs)} now, at most {rp['max_runs']} (+ retries); concurrency = whole bundles that "
             "fit on the cluster's nodes"]
    from ablate.spec.script import describe

    lines += describe(spec) + [f"store: {where}"]  # script arms (ablate.spec.script): how they run, each arm's code
    for line in lines:
        out.print(Text(line), soft_wrap=True)


def print_results_table(store, spec: Spec) -> None:
    """The experiment's table (ablate.cli.results) after a run: its runs read once, its config hashes
    from the spec that ran (resolved once, when it was loaded)."""
    from ablate.cli.results import print_table
    from ablate.analysis.tables import read_experiment

    try:
        exp = read_experiment(store, spec.name, spec)
        if exp.runs.empty:
            return
        print_table(exp, out)
    except AblateError as e:
        _say(err, "table:", "yellow", e)


# --------------------------------------------------------------------------------------------
# validate, status, rm
# --------------------------------------------------------------------------------------------
@app.command()
def validate(specs: List[Path] = typer.Argument(..., metavar="SPEC...", help="Spec files to check.")) -> None:
    """Check spec files (keys, types, arm names, every trainer override, the search space; scripts
    exist, patches apply) without running anything; every problem of a file is listed at once."""
    bad = 0
    for path in specs:
        try:
            spec = load_spec(path)
        except SpecError as e:
            bad += 1
            _say(err, "invalid", "bold red", e)
            continue
        n = len(spec.arms) * len(spec.max_seeds)
        _say(out, "ok", "green", f"{path}: {spec.name}, {spec.trainer_label}, {len(spec.arms)} arms, "
             f"{'up to ' if spec.sequential else ''}{n} runs, gpus_per_run {spec.resources.gpus_per_run}")
    raise typer.Exit(EXIT_BAD_INPUT if bad else EXIT_OK)


def _stored_spec(store, experiment: str):
    """The experiment's spec copy from the store, parsed once (None if absent or no longer valid,
    with a note), and whether a copy exists."""
    from ablate.spec.model import read_stored_spec

    try:  # script arms: their identity at the last run (script_arms.json), not today's files
        stored = read_stored_spec(store, experiment)
    except StoreError as e:
        raise _fail(e) from None
    if stored.problem is not None:
        _say(err, "note:", "yellow", f"the stored spec no longer validates ({stored.problem}); 'missing' not shown")
    return stored.spec, stored.exists


@app.command()
def status(experiment: str = typer.Argument(..., help="Experiment name (store folder)."),
           store_uri: str = STORE_OPT) -> None:
    """Counts by arm and status, runs in flight, runs still missing, and the driver holding the lock."""
    _check_name(experiment)
    store = _open_store(store_uri)
    try:
        df = store.runs(experiment)
        inflight = store.inflight(experiment)
    except StoreError as e:
        raise _fail(e) from None
    from ablate.store.lock import STALE_AFTER_S, read_lock

    try:
        holder = read_lock(store, experiment)
    except StoreError:
        holder = None
    spec, has_spec = _stored_spec(store, experiment)
    if not len(df) and not has_spec and holder is None:
        known = ", ".join(store.experiments()) or "none"
        raise _fail(SpecError(f"experiment={experiment!r} is not in store {store.uri!r} (experiments: {known}); "
                              "fix: check the name or pass --store"))
    missing_by_arm, search_note = {}, None
    if spec is not None:
        from ablate.spec.matrix import missing_runs

        try:
            missing_by_arm, search_note = missing_runs(spec, df)
        except (SpecError, ValueError) as e:
            _say(err, "note:", "yellow", f"cannot plan the stored spec ({e}); 'missing' not shown")
    arms = list(spec.arms) if spec else sorted(set(df["arm"])) if len(df) else []
    arms += [a for a in missing_by_arm if a not in arms]
    arms += sorted(set(df["arm"]) - set(arms)) if len(df) else []
    flying = {}
    for m in inflight:
        flying[m.get("arm")] = flying.get(m.get("arm"), 0) + 1
    statuses = ("ok", "diverged", "failed", "cancelled")
    table = Table("arm", *statuses, "in flight", "missing", title=Text(f"{experiment} ({store.uri})"))
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
        table.add_row(Text(str(arm)), *map(str, row), missing)
    table.add_row(Text("total", style="bold"), *map(str, totals))
    out.print(table)
    if search_note:
        out.print(search_note, markup=False, highlight=False, soft_wrap=True)
    for m in inflight:
        out.print(Text(f"in flight: {m.get('run_id')} (driver {m.get('driver_host')} pid {m.get('driver_pid')})"),
                  soft_wrap=True)
    if holder is not None:
        import time

        why = holder.stale_reason(time.time(), STALE_AFTER_S)
        text = (f"driver: {holder.describe(time.time())}" if why is None else
                f"stale lock (the next `ablate run` takes it over): {why}; {holder.describe(time.time())}")
        out.print(Text(text), soft_wrap=True)


@app.command()
def rm(experiment: str = typer.Argument(..., help="Experiment name (store folder)."),
       arms: List[str] = typer.Option([], "--arm", help="Remove this arm's runs (all attempts and config hashes); "
                                      "repeat for several arms."),
       run_ids: List[str] = typer.Option([], "--run", help="Remove this run attempt (its run_id); repeat for several."),
       yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
       store_uri: str = STORE_OPT, take_over: bool = TAKE_OVER_OPT) -> None:
    """Remove runs from the store: the whole experiment, or only --arm / --run.

    Asks for confirmation (or --yes). Refused while a driver holds the experiment's lock. A
    removed (arm, seed) runs again at the next `ablate run` of the spec."""
    from ablate.store.lock import experiment_lock
    from ablate.names import check_arm, check_run_id

    _check_name(experiment)
    try:
        for a in arms:
            check_arm(a, "--arm")
        for r in run_ids:
            check_run_id(r)
    except SpecError as e:
        raise _fail(e) from None
    store = _open_store(store_uri)
    try:
        df = store.runs(experiment)
        has_spec = store.read_bytes(experiment, "spec.yaml", max_bytes=2 * 1024 * 1024) is not None
    except StoreError as e:
        raise _fail(e) from None
    if not len(df) and not has_spec:
        known = ", ".join(store.experiments()) or "none"
        raise _fail(SpecError(f"experiment={experiment!r} is not in store {store.uri!r} (experiments: {known}); "
                              "fix: check the name or pass --store"))
    whole = not arms and not run_ids
    if not whole:
        unknown = [a for a in arms if not len(df) or a not in set(df["arm"])]
        unknown += [r for r in run_ids if not len(df) or r not in set(df["run_id"])]
        if unknown:
            known_arms = ", ".join(sorted(set(df["arm"]))) if len(df) else "none"
            raise _fail(SpecError(f"not in experiment {experiment!r}: {', '.join(map(repr, unknown))} (arms: "
                                  f"{known_arms}); fix: check the names with `ablate status {experiment}`"))
        sel = df[df["arm"].isin(arms) | df["run_id"].isin(run_ids)]
    else:
        sel = df
    counts = sel.groupby(["arm", "status"]).size() if len(sel) else {}
    per_arm: dict[str, list[str]] = {}
    for (arm, st), n in (counts.items() if len(sel) else []):
        per_arm.setdefault(arm, []).append(f"{n} {st}")
    detail = "; ".join(f"{a}: {', '.join(v)}" for a, v in per_arm.items()) or "no runs"
    what = (f"the whole experiment {experiment!r} ({len(sel)} run attempts: {detail}; its spec copy, reports and "
            "any study stored in its folder)" if whole else
            f"{len(sel)} run attempt(s) of experiment {experiment!r} ({detail})")
    where = store.display_path(experiment)
    if not yes:
        if not sys.stdin.isatty():
            raise _fail(SpecError(f"would remove {what} from {where}; not on a terminal, so nothing is asked: "
                                  "fix: add --yes"))
        if not typer.confirm(f"Remove {what} from {where}?", default=False):
            _say(err, "nothing removed", "yellow", "")
            raise typer.Exit(EXIT_FAILED)
    try:
        with experiment_lock(store, experiment, command=f"ablate rm {experiment}", take_over=take_over) as lock:
            if lock.took_over:
                _say(err, "note:", "yellow", lock.took_over)
            if whole:
                store.remove_experiment(experiment)
            else:
                store.remove_runs(experiment, sorted(sel["run_id"]))
    except AblateError as e:
        raise _fail(e) from None
    _say(out, "removed", "green", f"{what} from {where}")
    if not whole and len(sel) and "search" in set(sel["source"]):
        _say(err, "note:", "yellow", "the Optuna study still holds the removed suggestions' results; `ablate table` "
             "reads them from the study")


# `table`, `report`, `import-logs`, `rm`'s neighbours: the analysis commands (ablate/cli/analysis.py)
from ablate.cli import analysis as cli_analysis

cli_analysis.register(app)


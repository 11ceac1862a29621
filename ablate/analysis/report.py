"""`ablate report EXPERIMENT`: report.md and PNG figures written into the experiment's folder.

    ablate report EXPERIMENT [--store URI] [--baseline ARM] [--target LOSS]

report.md holds the results table (the same as `ablate table --format md`; for a search
experiment its trials listing and the confirmation's table), the figures of `ablate/analysis/plots.py`,
every run with its status, config and provenance, runs without an ok result with their errors,
step-time stalls, and warnings when runs mix torch versions or GPU models (time comparisons
across them are not like for like). Works on `ablate run`, imported (`ablate import-logs`),
search and mixed experiments. The figures show the runs the table compares (each arm's current
config; a search without confirmation: its best suggestions). `report_files` is the pure part
(frames in, bytes out); `write_report` takes the experiment as the command read it once
(ablate.analysis.tables.read_experiment) and writes through `Store.write_bytes`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pandas as pd

from ablate import __version__

from ablate.analysis import plots
from ablate.spec.model import Spec
from ablate.analysis.tables import Experiment, Settings, data_label, select_configs, table_from_runs, to_markdown

FIGURES = {
    "curves_step.png": "Val loss against step (mean ± 95% CI over seeds)",
    "curves_time.png": "Val loss against training time (mean ± 95% CI over seeds)",
    "finals.png": "Final val loss and train time of every run (bar: arm mean ± 95% CI; n per arm)",
    "step_times.png": "Step time of every run (× marks stalls)",
}
MAX_STALLS_LISTED = 10
MAX_SEARCH_ARMS_DRAWN = 8   # a search without confirmation: figures of its best suggestions


def _missing(v: Any) -> bool:
    """None, NaN, NaT or pd.NA (pandas 3 reads a null string as NaN)."""
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _cell(v: Any, fmt: str = "") -> str:
    if _missing(v):
        return "—"
    return format(v, fmt) if fmt else str(v).replace("|", "\\|")


def _host(r: dict) -> str | None:
    host = r.get("hostname")
    if not _missing(host) and str(host):
        return str(host)
    node = r.get("node_id")
    if _missing(node) or not str(node):
        return None
    node = str(node)
    return node[:12] + "…" if len(node) > 16 else node  # Ray node ids are 56 hex characters


def _runs_section(runs: pd.DataFrame, current: dict[str, str] | None = None) -> list[str]:
    """Every run; `current` (arm → config hash the table compares) marks runs of other configs."""
    current = current or {}
    lines = ["| Arm | Seed | Round | Status | Loss | Time (s) | Steps | Config | Host | GPU | torch | Source "
             "| Run id |",
             "|---|---:|---:|---|---:|---:|---:|---|---|---|---|---|---|"]
    for r in runs.to_dict("records"):
        t = None if _missing(r.get("train_time_ms")) else float(r["train_time_ms"]) / 1000.0
        gpu = None if _missing(r.get("gpu_model")) else str(r["gpu_model"])
        if gpu and not _missing(r.get("gpu_count")) and r["gpu_count"]:
            gpu = f"{int(r['gpu_count'])}× {gpu}"
        h = r.get("config_hash")
        config = None if _missing(h) else f"`{h}`" + (" (older)" if r["arm"] in current and current[r["arm"]] != h
                                                       else "")
        lines.append(f"| {_cell(r['arm'])} | {_cell(r['seed'])} | {_cell(r.get('round'))} | {_cell(r['status'])} | "
                     f"{_cell(r.get('final_val_loss'), '.4f')} | {_cell(t, '.4f')} | {_cell(r.get('steps'))} | "
                     f"{config or '—'} | {_cell(_host(r))} | {_cell(gpu)} | {_cell(r.get('torch_version'))} | "
                     f"{_cell(r.get('source'))} | `{r['run_id']}` |")
    if any("(older)" in line for line in lines[2:]):
        lines += ["", "Runs marked (older) ran a config other than their arm's current one and are not in the "
                  "table (`ablate table --all-configs` shows them)."]
    failed = runs[runs["status"] != "ok"]
    if len(failed):
        lines += ["", "### Runs without an ok result (diverged, failed, cancelled)", ""]
        lines += [f"- `{r['run_id']}` ({r['status']}): " +
                  (str(r.get("error")) if not _missing(r.get("error")) and str(r.get("error")) else "no error recorded")
                  for r in failed.to_dict("records")]
    return lines


def _environment_section(runs: pd.DataFrame) -> list[str]:
    out = []
    for col, what in (("torch_version", "torch"), ("gpu_model", "GPU"), ("triton_version", "triton"),
                      ("git_commit", "git commit"), ("driver", "driver"), ("script_sha256", "script sha256")):
        if col not in runs or (col == "script_sha256" and not runs[col].notna().any()):
            continue
        counts = runs[col].astype(object).where(runs[col].notna(), "unknown").value_counts()
        out.append(f"- {what}: " + ", ".join(f"`{k}` ({v} runs)" for k, v in counts.items()))
    if "data_hash" in runs:  # what the shards were (trainer start.data), per run
        syn = runs["data_synthetic"] if "data_synthetic" in runs else [None] * len(runs)
        labels = pd.Series([data_label(a, b) or "unknown" for a, b in zip(list(syn), runs["data_hash"].tolist())])
        out.append("- data: " + ", ".join(f"`{k}` ({v} runs)" for k, v in labels.value_counts().items()))
    warn = []
    ok = runs[runs["status"] == "ok"]
    for col, what in (("torch_version", "torch versions"), ("gpu_model", "GPU models")):
        if col in ok and ok[col].dropna().nunique() > 1:
            warn.append(f"**Warning:** ok runs mix {ok[col].dropna().nunique()} {what}; train time differs "
                        "between them by up to ~1 s, so time Δ compares unlike things unless each arm ran on "
                        "all of them equally (blocked analysis).")
    if "gpu_count" in ok and ok["gpu_count"].dropna().nunique() > 1:
        counts = ", ".join(str(int(g)) for g in sorted(set(ok["gpu_count"].dropna())))
        warn.append(f"**Warning:** ok runs mix GPU counts ({counts}); their train times differ many-fold, so "
                    "times are only comparable within one GPU count.")
    return out + ([""] + warn if warn else [])


def _stalls_section(steps: pd.DataFrame) -> list[str]:
    if steps.empty:
        return ["No step times recorded."]
    st = plots.stalls(steps)
    rule = (f"{plots.STALL_FACTOR:g}× the median of the {plots.STALL_WINDOW} logged steps around them (each "
            "batch-size stage against itself; step 1 excluded)")
    if st.empty:
        return [f"No step slower than {rule}."]
    st = st.assign(ratio=st["step_ms"] / st["ref_ms"]).sort_values("ratio", ascending=False, kind="stable")
    lines = [f"{len(st)} steps slower than {rule}, in {st['run_id'].nunique()} runs; the "
             f"{min(len(st), MAX_STALLS_LISTED)} worst:", "",
             "| Run id | Step | Step time (ms) | × local median |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['run_id']}` | {r['step']} | {r['step_ms']:.1f} | {r['ratio']:.1f} |"
              for r in st.head(MAX_STALLS_LISTED).to_dict("records")]
    return lines


def report_files(experiment: str, table: pd.DataFrame | str, settings: Settings, runs: pd.DataFrame,
                 curves: pd.DataFrame, steps: pd.DataFrame, spec: Spec | None = None,
                 figure_runs: pd.DataFrame | None = None, current: dict[str, str] | None = None) -> dict[str, bytes]:
    """Every file of the report by name: report.md and the PNGs.

    `table` is the analysed table (or its Markdown, e.g. a search's listing); `spec` the
    experiment's (its description and trainer head the report); the figures draw `figure_runs`
    (default: `runs`) and their curves/steps; the runs section lists every run."""
    fig_runs = runs if figure_runs is None else figure_runs
    ids = set(fig_runs["run_id"]) if len(fig_runs) else set()
    fig_curves = curves[curves["run_id"].isin(ids)].copy() if len(curves) else curves
    fig_steps = steps[steps["run_id"].isin(ids)].copy() if len(steps) else steps
    if len(fig_runs):  # labels as in the table (arm@hash rows keep their own label)
        label = dict(zip(fig_runs["run_id"], fig_runs["arm"]))
        for df in (fig_curves, fig_steps):
            if len(df):
                df["arm"] = df["run_id"].map(label)
    files = {
        "curves_step.png": plots.to_png(plots.curves_figure(fig_curves, fig_runs, "step", settings.baseline)),
        "curves_time.png": plots.to_png(plots.curves_figure(fig_curves, fig_runs, "time", settings.baseline)),
        "finals.png": plots.to_png(plots.finals_figure(fig_runs, settings.target, settings.baseline)),
        "step_times.png": plots.to_png(plots.step_times_figure(fig_steps, fig_runs, settings.baseline)),
    }
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Experiment `{experiment}`", ""]
    if spec is not None and spec.description:
        md += [spec.description, ""]
    trainer = spec.trainer if spec is not None and (spec.trainer.preset or spec.trainer.script) else None
    if trainer is not None or settings.target is not None:
        what = [f"Trainer preset `{trainer.preset}`"] if trainer is not None and trainer.preset else []
        if trainer is not None and trainer.script:  # a script experiment (ablate.spec.script)
            what.append(f"Training script `{trainer.script}`")
        what.append(f"baseline arm `{settings.baseline}`")
        if settings.target is not None:
            what.append(f"target loss {settings.target:g}")
        md += ["; ".join(what) + ".", ""]
    results = table if isinstance(table, str) else to_markdown(table, settings)
    md += [f"Generated {now} by ablate {__version__}. How to read the numbers: docs/statistics.md.", "",
           "## Results", "", results.rstrip(), "", "## Figures", ""]
    md += [f"![{title}]({name})\n" for name, title in FIGURES.items()]
    md += ["## Runs", ""] + _runs_section(runs, current) + ["", "## Step-time stalls", ""] + _stalls_section(steps)
    md += ["", "## Environment", ""] + _environment_section(runs) + [""]
    files["report.md"] = "\n".join(md).encode()
    return files


def _best_search_runs(runs: pd.DataFrame, n: int = MAX_SEARCH_ARMS_DRAWN) -> pd.DataFrame:
    """The runs of the n suggestions with the lowest mean final loss over their ok seeds."""
    ok = runs[runs["status"] == "ok"]
    best = ok.groupby("arm")["final_val_loss"].mean().sort_values(kind="stable").head(n).index
    return runs[runs["arm"].isin(set(best))]


def write_report(exp: Experiment, baseline: str | None = None, target: float | None = None,
                 table: str | None = None) -> dict[str, str]:
    """Analyse the experiment (as read once: ablate.analysis.tables.read_experiment) and write report.md and
    the PNGs into its folder; returns name → path/URI. `table`: the results table's Markdown when
    the caller has its own (a search's listing: ablate.cli.results.write_report passes it), else the
    significance table of the experiment's runs."""
    store, experiment, runs = exp.store, exp.name, exp.runs
    if runs.empty:
        raise exp.no_runs()
    settings = exp.settings(baseline, target)
    current = exp.current
    compared = runs[runs["source"] != "search"] if "source" in runs else runs
    results: pd.DataFrame | str = table if table is not None else table_from_runs(compared, settings, current)
    if len(compared):
        sel = select_configs(compared, settings.baseline, current)
        fig_runs = sel.runs
        current = {**sel.hashes, **current}
    else:
        fig_runs = _best_search_runs(runs)
    files = report_files(experiment, results, settings, runs, store.curves(experiment, runs),
                         store.steps(experiment, runs), exp.spec, figure_runs=fig_runs, current=current)
    return {name: store.write_bytes(experiment, name, data) for name, data in files.items()}

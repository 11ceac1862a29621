"""`ablate report EXPERIMENT`: report.md and PNG figures written into the experiment's folder.

    ablate report EXPERIMENT [--store URI] [--baseline ARM] [--target LOSS]

report.md holds the results table (the same as `ablate table --format md`), the figures of
`ablate/plots.py`, every run with its status and provenance, failed runs with their errors,
step-time stalls, and warnings when runs mix torch versions or GPU models (time comparisons
across them are not like for like). `report_files` is the pure part (frames in, bytes out);
`write_report` reads the store and writes through `Store.write_bytes`.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from ablate import __version__, plots
from ablate.tables import Settings, analyse, read_spec, to_markdown

FIGURES = {
    "curves_step.png": "Val loss against step (mean ± 95% CI over seeds)",
    "curves_time.png": "Val loss against training time (mean ± 95% CI over seeds)",
    "finals.png": "Final val loss and train time of every run (bar: arm mean)",
    "step_times.png": "Step time of every run (× marks stalls)",
}
MAX_STALLS_LISTED = 10


def _cell(v: Any, fmt: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or v is pd.NaT:
        return "—"
    try:
        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    return format(v, fmt) if fmt else str(v).replace("|", "\\|")


def _runs_section(runs: pd.DataFrame) -> list[str]:
    lines = ["| Arm | Seed | Round | Status | Loss | Time (s) | Steps | Node | GPU | torch | Source | Run id |",
             "|---|---:|---:|---|---:|---:|---:|---|---|---|---|---|"]
    for r in runs.to_dict("records"):
        node = r.get("node_id") or r.get("hostname")
        if node and len(node) > 16:  # Ray node ids are 56 hex characters; a prefix identifies them
            node = node[:12] + "…"
        t = r["train_time_ms"] / 1000.0 if r.get("train_time_ms") is not None and pd.notna(r["train_time_ms"]) else None
        gpu = r.get("gpu_model")
        if gpu and r.get("gpu_count"):
            gpu = f"{r['gpu_count']}× {gpu}"
        lines.append(f"| {_cell(r['arm'])} | {_cell(r['seed'])} | {_cell(r.get('round'))} | {_cell(r['status'])} | "
                     f"{_cell(r.get('final_val_loss'), '.4f')} | {_cell(t, '.3f')} | {_cell(r.get('steps'))} | "
                     f"{_cell(node)} | {_cell(gpu)} | {_cell(r.get('torch_version'))} | {_cell(r.get('source'))} | "
                     f"`{r['run_id']}` |")
    failed = runs[runs["status"] != "ok"]
    if len(failed):
        lines += ["", "### Runs that did not finish", ""]
        lines += [f"- `{r['run_id']}` ({r['status']}): {r.get('error') or 'no error recorded'}"
                  for r in failed.to_dict("records")]
    return lines


def _environment_section(runs: pd.DataFrame) -> list[str]:
    out = []
    for col, what in (("torch_version", "torch"), ("gpu_model", "GPU"), ("triton_version", "triton"),
                      ("git_commit", "git commit"), ("driver", "driver")):
        if col not in runs:
            continue
        counts = runs[col].fillna("unknown").value_counts()
        out.append(f"- {what}: " + ", ".join(f"`{k}` ({v} runs)" for k, v in counts.items()))
    warn = []
    ok = runs[runs["status"] == "ok"]
    for col, what in (("torch_version", "torch versions"), ("gpu_model", "GPU models")):
        if col in ok and ok[col].dropna().nunique() > 1:
            warn.append(f"**Warning:** ok runs mix {ok[col].dropna().nunique()} {what}; train time differs "
                        "between them by up to ~1 s, so time Δ compares unlike things unless each arm ran on "
                        "all of them equally (blocked analysis).")
    return out + ([""] + warn if warn else [])


def _stalls_section(steps: pd.DataFrame) -> list[str]:
    if steps.empty:
        return ["No step times recorded."]
    st = plots.stalls(steps)
    if st.empty:
        return [f"No step slower than {plots.STALL_FACTOR:g}× its run's median (step 1 excluded)."]
    med = steps[steps["step"] > 1].groupby("run_id")["step_ms"].median()
    st = st.assign(ratio=st["step_ms"] / st["run_id"].map(med)).sort_values("ratio", ascending=False)
    lines = [f"{len(st)} steps slower than {plots.STALL_FACTOR:g}× their run's median "
             f"({st['run_id'].nunique()} runs); the {min(len(st), MAX_STALLS_LISTED)} worst:", "",
             "| Run id | Step | Step time (ms) | × median |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['run_id']}` | {r['step']} | {r['step_ms']:.1f} | {r['ratio']:.1f} |"
              for r in st.head(MAX_STALLS_LISTED).to_dict("records")]
    return lines


def report_files(experiment: str, table: pd.DataFrame, settings: Settings, runs: pd.DataFrame,
                 curves: pd.DataFrame, steps: pd.DataFrame, spec: dict | None = None) -> dict[str, bytes]:
    """Every file of the report by name: report.md and the PNGs."""
    files = {
        "curves_step.png": plots.to_png(plots.curves_figure(curves, runs, "step", settings.baseline)),
        "curves_time.png": plots.to_png(plots.curves_figure(curves, runs, "time", settings.baseline)),
        "finals.png": plots.to_png(plots.finals_figure(runs, settings.target, settings.baseline)),
        "step_times.png": plots.to_png(plots.step_times_figure(steps, runs, settings.baseline)),
    }
    spec = spec or {}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Experiment `{experiment}`", ""]
    if spec.get("description"):
        md += [str(spec["description"]), ""]
    trainer = spec.get("trainer") or {}
    if trainer:
        md += [f"Trainer preset `{trainer.get('preset')}`; baseline arm `{settings.baseline}`"
               + (f"; target loss {settings.target:g}" if settings.target is not None else "") + ".", ""]
    md += [f"Generated {now} by ablate {__version__}. How to read the numbers: docs/statistics.md.", "",
           "## Results", "", to_markdown(table, settings).rstrip(), "", "## Figures", ""]
    md += [f"![{title}]({name})\n" for name, title in FIGURES.items()]
    md += ["## Runs", ""] + _runs_section(runs) + ["", "## Step-time stalls", ""] + _stalls_section(steps)
    md += ["", "## Environment", ""] + _environment_section(runs) + [""]
    files["report.md"] = "\n".join(md).encode()
    return files


def write_report(store: Any, experiment: str, baseline: str | None = None,
                 target: float | None = None) -> dict[str, str]:
    """Analyse the experiment and write report.md and the PNGs; returns name → path/URI."""
    table, settings = analyse(store, experiment, baseline, target)
    files = report_files(experiment, table, settings, store.runs(experiment), store.curves(experiment),
                         store.steps(experiment), read_spec(store, experiment))
    return {name: store.write_bytes(experiment, name, data) for name, data in files.items()}

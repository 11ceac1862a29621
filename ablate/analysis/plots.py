"""Figures of an experiment as PNG bytes (matplotlib, Agg canvas, no pyplot global state).

    ablate report EXPERIMENT        # writes these PNGs next to report.md

* `curves_figure(curves, runs, x="step"|"time")`: val loss per arm, mean ± t-based 95% CI
  band over seeds, against step or against training time (full curve, log scale, and the
  last 30% of training zoomed in);
* `finals_figure(runs, target)`: final val loss and train time of every run as strip plots
  with each arm's mean ± 95% CI and n, the baseline's mean as a dashed reference line (and the
  target loss as a red line);
* `step_times_figure(steps, runs)`: step time of every run against step, to spot stalls
  (steps slower than 1.5× the median of the STALL_WINDOW logged steps around them are marked:
  a later batch-size stage, whose steps are all longer, is measured against itself).
Inputs are the store's frames (contract columns); only runs with status "ok" are drawn, except
in the step-time traces, which show every run (a stall may be why a run failed).
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ablate.analysis import stats
from ablate.errors import PlotsUnavailable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STALL_FACTOR = 1.5
STALL_WINDOW = 21   # logged steps (centred) whose median a step is compared with
ZOOM_FRACTION = 0.3
CONFIDENCE = 0.95


def _new_figure(**kw) -> Figure:
    """A matplotlib Figure on no global state; matplotlib is imported here, so the rest of ablate
    (run, table, status) works without the `report` extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotsUnavailable(
            f"the report's figures need matplotlib ({e}); install it with `pip install -e \".[report]\"` "
            "(or `pip install 'matplotlib>=3.8,<4'`)") from None
    return Figure(**kw)


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _colors(arms: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(arms)}


def _arm_order(runs: pd.DataFrame, baseline: str | None) -> list[str]:
    arms = list(dict.fromkeys(runs.sort_values("order", kind="mergesort")["arm"])) if "order" in runs else \
        list(dict.fromkeys(runs["arm"]))
    if baseline in arms:
        arms.remove(baseline)
        arms.insert(0, baseline)
    return arms


def _ok_ids(runs: pd.DataFrame) -> set[str]:
    return set(runs.loc[runs["status"] == "ok", "run_id"])


def curve_bands(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, step): n, mean val loss, CI half-width, mean train time (s). Pure, for tests."""
    g = curves.assign(time_s=curves["train_time_ms"] / 1000.0).groupby(["arm", "step"])
    out = g.agg(n=("val_loss", "count"), mean=("val_loss", "mean"), std=("val_loss", "std"),
                time_s=("time_s", "mean")).reset_index()
    out["half"] = stats.ci_half_width(out["std"].to_numpy(), out["n"].to_numpy(), CONFIDENCE)
    return out


def curves_figure(curves: pd.DataFrame, runs: pd.DataFrame, x: str = "step",
                  baseline: str | None = None) -> Figure:
    """Val loss mean ± CI band per arm against `x` ("step" or "time")."""
    if x not in ("step", "time"):
        raise ValueError(f"x={x!r} must be 'step' or 'time'")
    fig = _new_figure(figsize=(11, 4.2))
    ax_full, ax_zoom = fig.subplots(1, 2)
    data = curves[curves["run_id"].isin(_ok_ids(runs))]
    arms = [a for a in _arm_order(runs, baseline) if a in set(data["arm"])]
    colors = _colors(arms)
    bands = curve_bands(data) if len(data) else pd.DataFrame()
    xcol, xlabel = ("step", "step") if x == "step" else ("time_s", "training time (s)")
    for arm in arms:
        b = bands[bands["arm"] == arm].sort_values("step")
        n_runs = int(b["n"].max()) if len(b) else 0
        for ax in (ax_full, ax_zoom):
            sel = b if ax is ax_full else b[b[xcol] >= b[xcol].max() * (1 - ZOOM_FRACTION)]
            # a lone eval point (e.g. only the final eval in the zoom) is a marker with an error bar
            ax.plot(sel[xcol], sel["mean"], color=colors[arm], lw=1.5, marker="o" if len(sel) == 1 else None,
                    ms=4, label=f"{arm} (n={n_runs})" if ax is ax_full else None)
            ok = sel["half"].notna()
            if len(sel) == 1 and ok.all():
                ax.errorbar(sel[xcol], sel["mean"], yerr=sel["half"], color=colors[arm], capsize=3, lw=1)
            ax.fill_between(sel.loc[ok, xcol], (sel["mean"] - sel["half"])[ok], (sel["mean"] + sel["half"])[ok],
                            color=colors[arm], alpha=0.2, lw=0)
    ax_full.set_yscale("log")
    ax_full.set_title("val loss (mean ± 95% CI over seeds)")
    ax_zoom.set_title(f"last {int(ZOOM_FRACTION * 100)}% of training")
    for ax in (ax_full, ax_zoom):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    if arms:
        ax_full.legend(fontsize=8)
    else:
        ax_full.text(0.5, 0.5, "no ok runs with a curve", ha="center", transform=ax_full.transAxes)
    return fig


def mean_ci(vals) -> tuple[float, float]:
    """Mean and half-width of its t-based CONFIDENCE interval (NaN below two values)."""
    s = stats.summarize(vals, CONFIDENCE)
    return s.mean, stats.ci_half_width(s.std, s.n, CONFIDENCE)


def finals_figure(runs: pd.DataFrame, target: float | None = None, baseline: str | None = None,
                  seed: int = 0) -> Figure:
    """Strip plots of final val loss and train time per run; per arm the mean (bar) ± 95% CI
    (error bar) and n in the tick label; the baseline's mean as a dashed line across each panel."""
    fig = _new_figure(figsize=(11, 4.2))
    ax_loss, ax_time = fig.subplots(1, 2)
    ok = runs[(runs["status"] == "ok") & runs["final_val_loss"].notna()]
    arms = [a for a in _arm_order(runs, baseline) if a in set(ok["arm"])]
    colors = _colors(arms)
    rng = np.random.default_rng(seed)       # jitter only; fixed seed keeps the PNG reproducible
    for i, arm in enumerate(arms):
        a = ok[ok["arm"] == arm]
        jitter = i + rng.uniform(-0.15, 0.15, len(a))
        for ax, vals in ((ax_loss, a["final_val_loss"].astype(float)),
                         (ax_time, a["train_time_ms"].astype(float) / 1000.0)):
            ax.scatter(jitter, vals, color=colors[arm], s=22, alpha=0.8, zorder=3)
            mean, half = mean_ci(vals)
            ax.hlines(mean, i - 0.3, i + 0.3, color="black", lw=2, zorder=4)
            if np.isfinite(half):
                ax.errorbar([i + 0.3], [mean], yerr=[half], color="black", capsize=3, lw=1.2, zorder=4)
            if arm == baseline:
                ax.axhline(mean, color="black", ls=":", lw=1, zorder=1, label=f"baseline mean ({arm})")
    labels = [f"{a}\n(n={int((ok['arm'] == a).sum())})" for a in arms]
    for ax, title in ((ax_loss, "final val loss per run"), (ax_time, "train time per run (s)")):
        ax.set_xticks(range(len(arms)), labels, rotation=20, ha="right")
        ax.set_title(title + f" — bar: mean ± {int(CONFIDENCE * 100)}% CI")
        ax.grid(axis="y", alpha=0.3)
    if target is not None:
        ax_loss.axhline(target, color="red", ls="--", lw=1, label=f"target {target:g}")
    for ax in (ax_loss, ax_time):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not arms:
        ax_loss.text(0.5, 0.5, "no ok runs", ha="center", transform=ax_loss.transAxes)
    return fig


def stalls(steps: pd.DataFrame, factor: float = STALL_FACTOR, window: int = STALL_WINDOW) -> pd.DataFrame:
    """Steps slower than `factor` × the median step time of the `window` logged steps of the same
    run centred on them (step 1, compilation, excluded), with that median as `ref_ms`.

    A local median, not the run's: the batch-size schedule makes later stages' steps longer
    (e.g. 31, 57 and 82 ms in a record's three stages), and each step must be compared with its
    own stage, or every step of the last stage reads as a stall."""
    s = steps[steps["step"] > 1].dropna(subset=["step_ms"]).sort_values(["run_id", "step"], kind="stable")
    ref = s.groupby("run_id", sort=False)["step_ms"].transform(
        lambda v: v.rolling(window, center=True, min_periods=1).median())
    s = s.assign(ref_ms=ref)
    return s[s["step_ms"] > factor * s["ref_ms"]]


def step_times_figure(steps: pd.DataFrame, runs: pd.DataFrame, baseline: str | None = None) -> Figure:
    """Step time (ms) against step for every run; stalls marked with ×."""
    fig = _new_figure(figsize=(11, 4.2))
    ax = fig.subplots()
    arms = [a for a in _arm_order(runs, baseline) if a in set(steps["arm"])]
    colors = _colors(arms)
    s = steps[steps["step"] > 1].dropna(subset=["step_ms"])
    for arm in arms:
        for i, (rid, r) in enumerate(s[s["arm"] == arm].groupby("run_id", sort=True)):
            ax.plot(r["step"], r["step_ms"], color=colors[arm], lw=0.7, alpha=0.6, label=arm if i == 0 else None)
    st = stalls(steps)
    top = float(np.nanpercentile(s["step_ms"], 99.5)) * 1.3 if len(s) else 1.0
    if len(st):   # stalls beyond the axis are drawn on its top edge
        ax.scatter(st["step"], np.minimum(st["step_ms"], top * 0.98), marker="x", color="black", s=18,
                   zorder=4, label=f"stall (> {STALL_FACTOR:g}× local median), {len(st)} steps")
    ax.set_ylim(0, top)
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms)")
    ax.set_title("step time per run (step 1 omitted: compilation)")
    ax.grid(alpha=0.3)
    if arms:
        ax.legend(fontsize=8)
    return fig

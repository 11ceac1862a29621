"""The results table in the speedrun record layout: rich, Markdown, CSV or JSON.

    ablate table EXPERIMENT [--format rich|md|csv|json] [--store URI] [--baseline ARM] [--target LOSS]

    Arm | Runs | Time μ | Time σ | Time Δ | Time p | Loss μ | Loss σ | Loss Δ | Loss p | p(<target) | Verdict

`table_from_runs` is the pure analysis (a runs DataFrame in, one numeric row per arm out);
`format_table` renders it; `render_table`/`print_table` read the store and the experiment's
spec.yaml (baseline, target_loss, analysis, sequential seeds). Formulas: docs/statistics.md.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ablate import stats
from ablate.errors import AblateError
from ablate.sequential import SeqPlan, arm_outcomes, plan_from_mapping

FORMATS = ("rich", "md", "csv", "json")
POWER = 0.8
SUGGEST_UP_TO = 64        # the verdict suggests more runs only up to this many runs per arm
LAYOUT = ["Arm", "Runs", "Time μ", "Time σ", "Time Δ", "Time p", "Loss μ", "Loss σ", "Loss Δ", "Loss p",
          "p(<target)", "Verdict"]
CSV_COLUMNS = ["arm", "runs", "failed", "time_mean_s", "time_std_s", "time_delta_s", "time_p", "loss_mean",
               "loss_std", "loss_delta", "loss_p", "p_below_target", "method", "verdict"]
METRICS = {"time": "time_s", "loss": "final_val_loss"}


class AnalysisError(AblateError):
    """The table or report cannot be made (no runs, bad option)."""


@dataclass(frozen=True)
class Settings:
    """How an experiment is analysed: from its spec.yaml, overridden by CLI flags."""

    baseline: str = "baseline"
    target: float | None = None
    alternative: str = "two-sided"
    correction: str = "holm"
    alpha: float = 0.05
    sequential: SeqPlan | None = None


def settings_from_spec(spec: dict | None, baseline: str | None = None, target: float | None = None) -> Settings:
    """Analysis settings from a spec.yaml mapping (None: defaults); flags win over the spec."""
    spec = spec if isinstance(spec, dict) else {}
    analysis = spec.get("analysis") or {}
    base = baseline or spec.get("baseline") or "baseline"
    tgt = target if target is not None else spec.get("target_loss")
    alt = stats.check_alternative(analysis.get("alternative", "two-sided"))
    corr = stats.check_correction(analysis.get("correction", "holm"))
    return Settings(base, None if tgt is None else float(tgt), alt, corr, float(analysis.get("alpha", 0.05)),
                    plan_from_mapping(spec, base, tgt))


def read_spec(store: Any, experiment: str) -> dict | None:
    raw = store.read_bytes(experiment, "spec.yaml")
    if not raw:
        return None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise AnalysisError(f"{experiment}/spec.yaml in the store is not valid YAML ({e}); fix: restore it "
                            "from experiments/ or pass --baseline/--target") from None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- analysis

def _arm_order(runs: pd.DataFrame, baseline: str) -> list[str]:
    if "order" in runs and runs["order"].notna().any():
        firsts = runs.groupby("arm", sort=False)["order"].min().sort_values(kind="mergesort")
        arms = list(firsts.index)
    else:
        arms = list(dict.fromkeys(runs["arm"]))
    return ([baseline] if baseline in arms else []) + [a for a in arms if a != baseline]


def _fmt_p(p: float) -> str:
    return "p<0.0001" if p < 0.0001 else f"p={p:.4f}"


def _metric_phrase(metric: str, delta: float, p: float, alpha: float, more: int | None,
                   sequential: bool, decision: Any = None) -> str:
    if math.isfinite(p) and p < alpha:
        if metric == "time":
            word = "faster" if delta < 0 else "slower"
        else:
            word = "lower loss" if delta < 0 else "higher loss"
        return f"{word}, {_fmt_p(p)}"
    if sequential and decision == "continue":
        return f"{metric}: undecided, sequential seeds still running"
    if more is not None and not sequential:
        return f"{metric}: needs ~{more} more runs per arm"
    return f"no detectable {metric} change"


def table_from_runs(runs_df: pd.DataFrame, baseline: str = "baseline", target: float | None = None,
                    alternative: str = "two-sided", correction: str = "holm", *, alpha: float = 0.05,
                    confidence: float = 0.95, sequential: SeqPlan | None = None) -> pd.DataFrame:
    """One row per arm (baseline first): summaries, comparisons with the baseline, verdict.

    Only status "ok" runs enter the statistics; failed/cancelled runs are counted. p columns are
    adjusted across arms by `correction` (raw values in *_p_raw). With `sequential`, *_p_raw are
    the group-sequential p-values of `ablate.sequential` instead of fixed-sample ones.
    """
    stats.check_alternative(alternative)
    stats.check_correction(correction)
    if runs_df.empty:
        return pd.DataFrame()
    runs = runs_df.copy()
    runs["time_s"] = runs["train_time_ms"].astype(float) / 1000.0
    ok = runs[runs["status"] == "ok"]
    arms = _arm_order(runs, baseline)
    base_ok = ok[ok["arm"] == baseline]
    others = [a for a in arms if a != baseline and baseline in arms]
    m = len(others)
    level = alpha / m if (correction != "none" and m > 1) else alpha
    outcomes = arm_outcomes(runs_df, sequential) if sequential is not None else {}

    rows = []
    for arm in arms:
        a_ok = ok[ok["arm"] == arm]
        status = runs.loc[runs["arm"] == arm, "status"]
        row: dict[str, Any] = {"arm": arm, "is_baseline": arm == baseline, "runs": len(a_ok),
                               "failed": int((status == "failed").sum()),
                               "cancelled": int((status == "cancelled").sum())}
        pairs = stats.pair_runs(a_ok, base_ok) if arm in others else None
        row["n_pairs"] = len(pairs[0]) if pairs is not None else 0
        for metric, col in METRICS.items():
            s = stats.summarize(a_ok[col], confidence)
            row.update({f"{metric}_mean": s.mean, f"{metric}_std": s.std, f"{metric}_se": s.se,
                        f"{metric}_ci_low": s.ci_low, f"{metric}_ci_high": s.ci_high})
            cmp_cols = dict.fromkeys(["delta", "delta_ci_low", "delta_ci_high", "p_raw", "g", "runs_needed"], math.nan)
            method = ""
            if arm in others:
                if pairs is not None:
                    c = stats.paired(a_ok.loc[pairs[0], col], base_ok.loc[pairs[1], col], alternative, confidence)
                    d = (a_ok.loc[pairs[0], col].to_numpy(float) - base_ok.loc[pairs[1], col].to_numpy(float))
                    need = stats.runs_needed_paired(c.delta, float(np.std(d, ddof=1)), level, POWER, alternative) \
                        if len(d) > 1 else None
                else:
                    c = stats.welch(a_ok[col], base_ok[col], alternative, confidence)
                    need = stats.runs_needed(c.delta, s.std, float(base_ok[col].std(ddof=1)), level, POWER,
                                             alternative) if len(a_ok) > 1 and len(base_ok) > 1 else None
                p_raw = c.p
                if sequential is not None and (arm, metric) in outcomes:
                    p_raw = outcomes[(arm, metric)].p
                    row[f"{metric}_decision"] = outcomes[(arm, metric)].decision
                method = c.method
                cmp_cols.update(delta=c.delta, delta_ci_low=c.ci_low,
                                delta_ci_high=c.ci_high, p_raw=p_raw, g=c.g,
                                runs_needed=float(need) if need is not None else math.nan)
            row.update({f"{metric}_{k}": v for k, v in cmp_cols.items()})
            row[f"{metric}_method"] = method
        row["p_target"] = stats.target_pvalue(a_ok["final_val_loss"], target) if target is not None else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    for metric in METRICS:
        df[f"{metric}_p"] = stats.adjust_pvalues(df[f"{metric}_p_raw"].to_numpy(float), correction)
    df["verdict"] = [_verdict(r, alpha, target, sequential is not None, baseline in arms, len(arms))
                     for r in df.to_dict("records")]
    return df


def _more_runs(r: dict, metric: str) -> int | None:
    need = r[f"{metric}_runs_needed"]
    if not math.isfinite(need) or need > SUGGEST_UP_TO:
        return None
    have = r["n_pairs"] if r[f"{metric}_method"] == "paired" else r["runs"]
    return max(int(need) - int(have), 1)


def _verdict(r: dict, alpha: float, target: float | None, sequential: bool, has_baseline: bool,
             n_arms: int = 2) -> str:
    parts = []
    if r["is_baseline"]:
        parts.append("baseline")
    elif not has_baseline:
        if n_arms > 1:
            parts.append("no baseline to compare with")
    elif r["runs"] < 2:
        parts.append("needs ≥ 2 ok runs")
    else:
        for metric in ("time", "loss"):
            parts.append(_metric_phrase(metric, r[f"{metric}_delta"], r[f"{metric}_p"], alpha,
                                        _more_runs(r, metric), sequential, r.get(f"{metric}_decision")))
        if all(p.startswith("no detectable") for p in parts):
            parts = ["no detectable change"]
    if target is not None and math.isfinite(r["p_target"]):
        if r["p_target"] < stats.TARGET_ALPHA:
            parts.append(f"below target, {_fmt_p(r['p_target'])}")
        else:
            parts.append(f"not shown below target ({_fmt_p(r['p_target'])})")
    return "; ".join(parts) or "—"


# ---------------------------------------------------------------- rendering

def _num(x: float, spec: str, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return format(x, ("+" if signed else "") + spec)


def _p(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return "<0.0001" if x < 0.0001 else f"{x:.4f}"


def _runs_cell(r: dict) -> str:
    extra = [f"+{r[k]} {k}" for k in ("failed", "cancelled") if r[k]]
    return f"{r['runs']}" + (f" ({', '.join(extra)})" if extra else "")


def display_rows(df: pd.DataFrame, target: float | None) -> list[list[str]]:
    """Cells of the record layout, as strings (time 3 decimals in s, loss and p 4 decimals)."""
    out = []
    for r in df.to_dict("records"):
        out.append([r["arm"], _runs_cell(r), _num(r["time_mean"], ".3f"), _num(r["time_std"], ".3f"),
                    _num(r["time_delta"], ".3f", True), _p(r["time_p"]), _num(r["loss_mean"], ".4f"),
                    _num(r["loss_std"], ".4f"), _num(r["loss_delta"], ".4f", True), _p(r["loss_p"]),
                    _p(r["p_target"]) if target is not None else "—", r["verdict"]])
    return out


def notes(df: pd.DataFrame, settings: Settings) -> list[str]:
    """Footnotes saying how every number was computed."""
    if df.empty:
        return []
    arms = set(df["arm"])
    others = df[~df["is_baseline"]]
    out = []
    if settings.baseline not in arms:
        out.append(f"No arm named `{settings.baseline}`: nothing to compare with; pass --baseline ARM "
                   f"(arms: {', '.join(sorted(arms))}).")
    else:
        kind = {"two-sided": "two-sided", "less": "one-sided (arm < baseline)",
                "greater": "one-sided (arm > baseline)"}[settings.alternative]
        corr = {"holm": f"Holm-adjusted over {len(others)} arm(s)", "bh": f"Benjamini–Hochberg-adjusted over "
                f"{len(others)} arm(s)", "none": "not adjusted"}[settings.correction]
        out.append(f"Time = train_time in seconds; Δ = arm − `{settings.baseline}`; p: Welch t-test (paired where "
                   f"blocked), {kind}, "
                   f"{corr}; significant at α = {settings.alpha:g}. Only ok runs count.")
        paired = others[others["time_method"] == "paired"]
        if len(paired):
            out.append("Blocked analysis (paired t-test, Δ and p over runs with the same node, round and seed) for: " +
                       ", ".join(f"{a} ({n} pairs)" for a, n in zip(paired["arm"], paired["n_pairs"])) + ".")
        if settings.sequential is not None:
            s = settings.sequential
            out.append(f"Sequential seeds (min {s.min}, max {s.max}, α {s.alpha:g}): time/loss p are "
                       "group-sequential p-values (stage-wise ordering) at the look where each comparison "
                       "was decided; μ, σ and Δ use all ok runs.")
        else:
            out.append(f"\"needs ~N more runs per arm\": runs per arm to detect the observed Δ with power "
                       f"{POWER:g} at α/{max(len(others), 1)} (docs/statistics.md).")
    if settings.target is not None:
        out.append(f"p(<target): scipy.stats.ttest_1samp(losses, {settings.target:g}, alternative=\"less\"), "
                   f"not adjusted; a record needs p < {stats.TARGET_ALPHA:g}.")
    return out


def to_markdown(df: pd.DataFrame, settings: Settings) -> str:
    head = "| " + " | ".join(LAYOUT) + " |"
    align = "|" + "|".join(["---", "---:"] + ["---:"] * 9 + ["---"]) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in display_rows(df, settings.target)]
    text = "\n".join([head, align, *body])
    foot = notes(df, settings)
    return text + ("\n\n" + "\n".join(f"- {n}" for n in foot) if foot else "") + "\n"


def to_csv(df: pd.DataFrame, settings: Settings) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in df.to_dict("records"):
        w.writerow([r["arm"], r["runs"], r["failed"], _plain(r["time_mean"], 3), _plain(r["time_std"], 3),
                    _plain(r["time_delta"], 3), _plain_p(r["time_p"]), _plain(r["loss_mean"], 4),
                    _plain(r["loss_std"], 4), _plain(r["loss_delta"], 4), _plain_p(r["loss_p"]),
                    _plain_p(r["p_target"]), r["loss_method"], r["verdict"]])
    return buf.getvalue()


def _plain(x: float, digits: int) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _plain_p(x: float) -> str:
    """p to 4 decimals; below 0.0001 written "<0.0001" (never a false 0.0000)."""
    return "" if x is None or not math.isfinite(x) else _p(x)


def _json_value(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(f"{float(v):.10g}") if math.isfinite(v) else None
    return v


def to_json(df: pd.DataFrame, settings: Settings, experiment: str) -> str:
    doc = {"experiment": experiment, **{k: v for k, v in asdict(settings).items() if k != "sequential"},
           "sequential": asdict(settings.sequential) if settings.sequential else None,
           "notes": notes(df, settings),
           "arms": [{k: _json_value(v) for k, v in r.items()} for r in df.to_dict("records")]}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def to_rich(df: pd.DataFrame, settings: Settings, experiment: str):
    from rich.table import Table
    from rich.text import Text

    # values as Text, never markup: an arm, host or note with "[...]" prints as written
    t = Table(title=Text(f"{experiment}"), caption=Text("\n".join(notes(df, settings))), caption_justify="left")
    for i, name in enumerate(LAYOUT):
        t.add_column(name, justify="left" if i in (0, 11) else "right", no_wrap=i not in (11,))
    for row, r in zip(display_rows(df, settings.target), df.to_dict("records")):
        verdict = row[-1]
        style = "bold green" if any(w in verdict for w in ("faster", "lower loss")) else (
            "bold red" if any(w in verdict for w in ("slower", "higher loss")) else "")
        t.add_row(*(Text(str(c)) for c in row[:-1]), Text(verdict, style=style),
                  style="bold" if r["is_baseline"] else None)
    return t


def format_table(df: pd.DataFrame, settings: Settings, fmt: str = "rich", experiment: str = ""):
    """Render an analysed table: a rich Table for "rich", a str for md/csv/json."""
    if fmt == "md":
        return to_markdown(df, settings)
    if fmt == "csv":
        return to_csv(df, settings)
    if fmt == "json":
        return to_json(df, settings, experiment)
    if fmt == "rich":
        return to_rich(df, settings, experiment)
    raise AnalysisError(f"format={fmt!r} is not one of {', '.join(FORMATS)}; fix: --format md")


def analyse(store: Any, experiment: str, baseline: str | None = None,
            target: float | None = None) -> tuple[pd.DataFrame, Settings]:
    """Read runs and spec.yaml from the store and analyse them."""
    runs = store.runs(experiment)
    if "source" in runs.columns:  # search suggestions are listed by search_table, not compared here
        runs = runs[runs["source"] != "search"]
    if runs.empty:
        known = ", ".join(store.experiments()) or "none"
        raise AnalysisError(f"experiment {experiment!r} has no runs in this store (experiments: {known}); "
                            "fix: check the name or pass --store URI")
    settings = settings_from_spec(read_spec(store, experiment), baseline, target)
    df = table_from_runs(runs, settings.baseline, settings.target, settings.alternative, settings.correction,
                         alpha=settings.alpha, sequential=settings.sequential)
    return df, settings


def render_table(store: Any, experiment: str, fmt: str = "rich", baseline: str | None = None,
                 target: float | None = None):
    """The experiment's table: a rich Table for fmt="rich", a str for "md", "csv" and "json"."""
    if fmt not in FORMATS:
        raise AnalysisError(f"format={fmt!r} is not one of {', '.join(FORMATS)}; fix: --format md")
    from ablate.search_report import is_search_experiment, search_table

    if is_search_experiment(store, experiment):
        return search_table(store, experiment, fmt, baseline, target)
    df, settings = analyse(store, experiment, baseline, target)
    return format_table(df, settings, fmt, experiment)


def print_table(store: Any, experiment: str, console=None, baseline: str | None = None,
                target: float | None = None) -> None:
    """Print the rich table to `console` (default: a new rich Console on stdout)."""
    if console is None:
        from rich.console import Console
        console = Console()
    console.print(render_table(store, experiment, "rich", baseline, target))

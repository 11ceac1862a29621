"""The results table in the speedrun record layout: rich, Markdown, CSV or JSON.

    ablate table EXPERIMENT [--format rich|md|csv|json] [--store URI] [--baseline ARM] [--target LOSS]
                            [--all-configs]

    Arm | Runs | Time μ | Time σ | Time Δ | Time p | Loss μ | Loss σ | Loss Δ | Loss p | p(<target) | Verdict

`read_experiment` reads an experiment from the store once per command: its runs, its spec.yaml
copy (parsed once by the model, ablate.spec.model.read_stored_spec) and settings.json (a target stored
by `ablate import-logs --target`). `settings_from_spec` takes the baseline, target_loss, analysis
block and sequential seeds from that Spec (the model holds every default; flags override them);
`table_from_runs` is the pure analysis (a runs DataFrame and Settings in, one numeric row per
arm out); `format_table` renders it. Search experiments get their table from
ablate.search.report; ablate.cli.results picks which. Each arm counts only the runs of its current
config (`select_configs`); `--all-configs` shows every config of an arm as its own row. Times in
md and rich have 4 decimals like the record tables (132.7217 s); CSV and JSON keep full precision.
An experiment whose ok runs read different data (the rows' data_synthetic / data_hash) is marked:
a first footnote names each arm's data, the rich title and the JSON (`mixed_data`) flag it.
Formulas: docs/statistics.md.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from ablate.analysis import stats
from ablate.errors import AnalysisError, SpecError
from ablate.analysis.sequential import SeqPlan, arm_outcomes, plan_from_spec
from ablate.spec.model import Spec, StoredSpec, analysis_spec, read_stored_spec

FORMATS = ("rich", "md", "csv", "json")
POWER = 0.8
SUGGEST_UP_TO = 64        # the verdict suggests more runs only up to this many runs per arm
LAYOUT = ["Arm", "Runs", "Time μ", "Time σ", "Time Δ", "Time p", "Loss μ", "Loss σ", "Loss Δ", "Loss p",
          "p(<target)", "Verdict"]
CSV_COLUMNS = ["arm", "config_hash", "runs", "diverged", "failed", "cancelled", "left_out_runs", "time_mean_s",
               "time_std_s", "time_delta_s", "time_p", "loss_mean", "loss_std", "loss_delta", "loss_p",
               "p_below_target", "method", "verdict"]
METRICS = {"time": "time_s", "loss": "final_val_loss"}
SETTINGS_FILE = "settings.json"   # per experiment, next to spec.yaml: {"target_loss": ...} (import-logs --target)


@dataclass(frozen=True)
class Settings:
    """How an experiment is analysed: its spec's baseline, target_loss, analysis block and
    sequential seeds, overridden by CLI flags. Made by `settings_from_spec`; no default of the
    spec is stated here (the model ablate.spec.model.Spec holds them)."""

    baseline: str
    target: float | None
    alternative: str
    correction: str
    alpha: float
    sequential: SeqPlan | None
    all_configs: bool = False   # a CLI flag, not a spec field: every config of an arm as its own row


def settings_from_spec(spec: Spec | None, baseline: str | None = None, target: float | None = None,
                       stored: dict | None = None, all_configs: bool = False) -> Settings:
    """Analysis settings from a Spec parsed by the model (None: no spec, the model's defaults) and
    the experiment's settings.json (`stored`); flags win over the spec, the spec over settings.json."""
    spec = spec if spec is not None else analysis_spec({})[0]
    stored = stored if isinstance(stored, dict) else {}
    base = baseline or spec.baseline
    tgt = target if target is not None else (
        spec.target_loss if "target_loss" in spec.model_fields_set else stored.get("target_loss"))
    tgt = None if tgt is None else float(tgt)
    return Settings(base, tgt, spec.analysis.alternative, spec.analysis.correction, spec.analysis.alpha,
                    plan_from_spec(spec, base, tgt), all_configs)


def read_settings(store: Any, experiment: str) -> dict:
    """The experiment's settings.json ({} when absent or unreadable as a JSON object)."""
    raw = store.read_bytes(experiment, SETTINGS_FILE)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        raise AnalysisError(f"{experiment}/{SETTINGS_FILE} in the store is not valid JSON; fix: delete it and "
                            "import again with --target, or pass --target") from None
    return data if isinstance(data, dict) else {}


def store_target(store: Any, experiment: str, target: float) -> str:
    """Record the experiment's target loss in settings.json (used when spec.yaml sets none)."""
    data = {**read_settings(store, experiment), "target_loss": float(target)}
    return store.write_bytes(experiment, SETTINGS_FILE, (json.dumps(data, indent=1) + "\n").encode())


def current_hashes(spec: Spec | None) -> dict[str, str]:
    """arm → config_hash of a whole spec's arms ({} without one: then every arm's latest config
    counts, as for arms not in the spec). Each arm resolves once (Spec caches its configs)."""
    if spec is None:
        return {}
    try:
        return {arm: spec.config_hash(arm) for arm in spec.arms}
    except (SpecError, ValueError):
        return {}


@dataclass(frozen=True, eq=False)
class Experiment:
    """An experiment as one command reads it from the store, once: every run attempt (`runs`),
    its spec copy parsed once by the model (`stored`; `ablate run` passes its own spec) and
    settings.json (`settings_file`). Analysis, report and status take this, not the store."""

    store: Any
    name: str
    runs: pd.DataFrame
    stored: StoredSpec
    settings_file: dict = field(default_factory=dict)

    @property
    def spec(self) -> Spec:
        """What the analysis reads: the whole spec, else the stored copy's analysis fields."""
        return self.stored.analysis

    @cached_property
    def current(self) -> dict[str, str]:
        """arm → its current config hash (the whole spec's; {} without one)."""
        return current_hashes(self.stored.spec)

    def settings(self, baseline: str | None = None, target: float | None = None,
                 all_configs: bool = False) -> Settings:
        """Settings from the spec and settings.json, overridden by the flags."""
        return settings_from_spec(self.spec, baseline, target, self.settings_file, all_configs)

    def no_runs(self) -> AnalysisError:
        known = ", ".join(self.store.experiments()) or "none"
        return AnalysisError(f"experiment {self.name!r} has no runs in this store (experiments: {known}); "
                             "fix: check the name or pass --store URI")


def read_experiment(store: Any, experiment: str, spec: Spec | None = None) -> Experiment:
    """Read the experiment once: runs, spec.yaml (or `spec`, the caller's own: `ablate run`) and
    settings.json."""
    stored = StoredSpec(spec, spec, store.display_path(experiment, "spec.yaml")) if spec is not None \
        else read_stored_spec(store, experiment)
    return Experiment(store, experiment, store.runs(experiment), stored, read_settings(store, experiment))


# ---------------------------------------------------------------- analysis

def _arm_order(runs: pd.DataFrame, baseline: str) -> list[str]:
    if "order" in runs and runs["order"].notna().any():
        firsts = runs.groupby("arm", sort=False)["order"].min().sort_values(kind="mergesort")
        arms = list(firsts.index)
    else:
        arms = list(dict.fromkeys(runs["arm"]))
    return ([baseline] if baseline in arms else []) + [a for a in arms if a != baseline]


@dataclass(frozen=True)
class ConfigSelection:
    """Which runs a table compares: `runs` (arm relabelled `arm@hash` for other configs in
    all-configs mode), the row labels in order, each label's config hash, and per arm the runs and
    configs left out (default mode)."""

    runs: pd.DataFrame
    labels: list[str]
    hashes: dict[str, str]
    left_out: dict[str, tuple[int, int]]


def select_configs(runs: pd.DataFrame, baseline: str, current: Mapping[str, str] | None = None,
                   all_configs: bool = False) -> ConfigSelection:
    """Per arm, the runs of its current config: `current[arm]` (the spec's hash), else the config of
    the arm's latest run (highest `order`: arms not in the spec, imported logs). Runs of other
    configs of the arm (an edited override, another script) are left out and counted; with
    `all_configs` each of them is a row of its own labelled `arm@config_hash`, placed after the arm."""
    arms = _arm_order(runs, baseline) if len(runs) else []
    if runs.empty or "config_hash" not in runs:
        return ConfigSelection(runs, arms, {}, {})
    current = current or {}
    ordered = runs.sort_values("order", kind="mergesort") if "order" in runs else runs
    keep, labels, hashes, left_out = [], [], {}, {}
    for arm in arms:
        sub = ordered[ordered["arm"] == arm]
        cur = current.get(arm) or sub["config_hash"].iloc[-1]
        mine = sub["config_hash"] == cur
        labels.append(arm)
        hashes[arm] = cur
        keep.append(sub[mine])
        others = list(dict.fromkeys(sub.loc[~mine, "config_hash"]))
        if not others:
            continue
        if all_configs:
            for h in others:
                label = f"{arm}@{h}"
                labels.append(label)
                hashes[label] = h
                keep.append(sub[sub["config_hash"] == h].assign(arm=label))
        else:
            left_out[arm] = (int((~mine).sum()), len(others))
    kept = pd.concat(keep) if keep else runs.iloc[:0]
    return ConfigSelection(kept, labels, hashes, left_out)


def data_label(synthetic: Any, data_hash: Any) -> str | None:
    """"synthetic <hash>" / "non-synthetic <hash>" for a run's data columns; None when unknown."""
    if data_hash is None or (isinstance(data_hash, float) and math.isnan(data_hash)):
        return None
    kind = "synthetic" if synthetic is True or synthetic == 1 else "non-synthetic"
    return f"{kind} {data_hash}"


def _arm_data(runs: pd.DataFrame) -> str:
    """The data sources of some ok runs, e.g. "non-synthetic 1a2b3c4d5e6f7a8b" ("" when unknown)."""
    if "data_hash" not in runs:
        return ""
    syn = runs["data_synthetic"] if "data_synthetic" in runs else pd.Series([None] * len(runs), index=runs.index)
    labels = {data_label(a, b) for a, b in zip(syn.tolist(), runs["data_hash"].tolist())}
    return ", ".join(sorted(x for x in labels if x))


def mixed_data(df: pd.DataFrame) -> bool:
    """Whether the analysed arms' ok runs read more than one data source (known ones only)."""
    if df.empty or "data" not in df:
        return False
    return len({x for cell in df["data"] for x in cell.split(", ") if x}) > 1


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


def table_from_runs(runs_df: pd.DataFrame, settings: Settings, current: Mapping[str, str] | None = None, *,
                    confidence: float = 0.95) -> pd.DataFrame:
    """One row per arm (baseline first): summaries, comparisons with the baseline, verdict.

    Each arm counts only its current config's runs (`select_configs`; `current` maps arm → the
    spec's config hash); left-out runs are counted in `left_out_runs`/`left_out_configs`, or with
    `all_configs` shown as rows `arm@hash`. Only status "ok" runs enter the statistics;
    diverged/failed/cancelled runs are counted (diverged ones in the verdict too). p columns are
    adjusted across rows by `correction` (raw values in *_p_raw). With `sequential`, *_p_raw are
    the group-sequential p-values of `ablate.analysis.sequential` instead of fixed-sample ones.
    """
    baseline, target, alternative, correction = (settings.baseline, settings.target, settings.alternative,
                                                 settings.correction)
    alpha, sequential, all_configs = settings.alpha, settings.sequential, settings.all_configs
    stats.check_alternative(alternative)
    stats.check_correction(correction)
    if runs_df.empty:
        return pd.DataFrame()
    sel = select_configs(runs_df, baseline, current, all_configs)
    runs = sel.runs.copy()
    runs["time_s"] = runs["train_time_ms"].astype(float) / 1000.0
    ok = runs[runs["status"] == "ok"]
    arms = sel.labels
    base_ok = ok[ok["arm"] == baseline]
    others = [a for a in arms if a != baseline and baseline in arms]
    m = len(others)
    level = alpha / m if (correction != "none" and m > 1) else alpha
    outcomes = arm_outcomes(sel.runs, sequential) if sequential is not None else {}

    rows = []
    for arm in arms:
        a_ok = ok[ok["arm"] == arm]
        status = runs.loc[runs["arm"] == arm, "status"]
        out_runs, out_configs = sel.left_out.get(arm, (0, 0))
        row: dict[str, Any] = {"arm": arm, "config_hash": sel.hashes.get(arm, ""), "is_baseline": arm == baseline,
                               "runs": len(a_ok), "diverged": int((status == "diverged").sum()),
                               "failed": int((status == "failed").sum()),
                               "cancelled": int((status == "cancelled").sum()),
                               "left_out_runs": out_runs, "left_out_configs": out_configs,
                               "baseline_runs": len(base_ok), "data": _arm_data(a_ok)}
        if "gpu_count" in a_ok:  # world sizes pooled in one arm make its time μ/σ meaningless (notes)
            row["gpu_counts"] = ",".join(str(int(g)) for g in sorted(set(a_ok["gpu_count"].dropna())))
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
    if r.get("diverged"):  # a loss that went non-finite is a result about the config: say it first
        parts.append(f"diverged {r['diverged']}/{r['diverged'] + r['runs']}")
    if r["is_baseline"]:
        pass
    elif not has_baseline:
        if n_arms > 1:
            parts.append("no baseline to compare with")
    elif r["runs"] < 2:
        parts.append("needs ≥ 2 ok runs")
    elif r.get("baseline_runs", 2) < 2:
        parts.append("baseline needs ≥ 2 ok runs")
    else:
        start = len(parts)
        for metric in ("time", "loss"):
            parts.append(_metric_phrase(metric, r[f"{metric}_delta"], r[f"{metric}_p"], alpha,
                                        _more_runs(r, metric), sequential, r.get(f"{metric}_decision")))
        if all(p.startswith("no detectable") for p in parts[start:]):
            parts[start:] = ["no detectable change"]
    if target is not None and math.isfinite(r["p_target"]):
        if r["p_target"] < stats.TARGET_ALPHA:
            parts.append(f"below target, {_fmt_p(r['p_target'])}")
        else:
            parts.append(f"not shown below target ({_fmt_p(r['p_target'])})")
    return "; ".join(parts) or "—"


# ---------------------------------------------------------------- rendering

def _num(x: float, spec: str, signed: bool = False) -> str:
    """x formatted with `spec`; "—" for NaN/None; a value that rounds to zero is "0.0000", never "-0.0000"."""
    if x is None or not math.isfinite(x):
        return "—"
    text = format(x, ("+" if signed else "") + spec)
    if float(text) == 0:
        text = format(0.0, spec)
    return text


def _p(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return "<0.0001" if x < 0.0001 else f"{x:.4f}"


def _runs_cell(r: dict) -> str:
    extra = [f"+{r[k]} {k}" for k in ("diverged", "failed", "cancelled") if r.get(k)]
    return f"{r['runs']}" + (f" ({', '.join(extra)})" if extra else "")


def display_rows(df: pd.DataFrame, target: float | None) -> list[list[str]]:
    """Cells of the record layout, as strings: times in s, loss and p with 4 decimals (132.7217)."""
    out = []
    for r in df.to_dict("records"):
        out.append([r["arm"], _runs_cell(r), _num(r["time_mean"], ".4f"), _num(r["time_std"], ".4f"),
                    _num(r["time_delta"], ".4f", True), _p(r["time_p"]), _num(r["loss_mean"], ".4f"),
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
    if mixed_data(df):
        per_arm = "; ".join(f"{r['arm']}: {r['data'] or 'unknown'}" for r in df.to_dict("records"))
        out.append(f"**Mixed data sources:** the ok runs read different data (data_synthetic, data_hash), so "
                   f"the differences mix the arms with their data — {per_arm}. Rerun on one data directory.")
    if settings.baseline not in arms:
        out.append(f"No arm named `{settings.baseline}`: nothing to compare with; pass --baseline ARM "
                   f"(arms: {', '.join(sorted(arms))}).")
    else:
        kind = {"two-sided": "two-sided", "less": "one-sided (arm < baseline)",
                "greater": "one-sided (arm > baseline)"}[settings.alternative]
        what = "row(s)" if settings.all_configs else "arm(s)"
        corr = {"holm": f"Holm-adjusted over {len(others)} {what}", "bh": f"Benjamini–Hochberg-adjusted over "
                f"{len(others)} {what}", "none": "not adjusted"}[settings.correction]
        out.append(f"Time = train_time in seconds; Δ = arm − `{settings.baseline}`; p: Welch t-test (paired where "
                   f"blocked), {kind}, "
                   f"{corr}; significant at α = {settings.alpha:g}. Only ok runs count.")
        paired = others[others["time_method"] == "paired"]
        if len(paired):
            out.append("Blocked analysis (paired t-test, Δ and p over runs with the same machine (host and GPUs), "
                       "round and seed) for: " +
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
    if "diverged" in df and df["diverged"].sum():
        out.append("Diverged runs (a non-finite loss at some eval) are counted (\"diverged d/n\" of the runs that "
                   "finished), not averaged: μ, σ, Δ and p are over the ok runs only.")
    if "gpu_counts" in df and df["gpu_counts"].str.contains(",", regex=False).any():
        mixed = df[df["gpu_counts"].str.contains(",", regex=False)]
        out.append("Warning: ok runs with different GPU counts are pooled in " +
                   ", ".join(f"{a} ({g.replace(',', ', ')} GPUs)" for a, g in zip(mixed["arm"], mixed["gpu_counts"])) +
                   ": their time μ and σ mix unlike runs; import or run each GPU count as its own arm.")
    if "left_out_runs" in df and df["left_out_runs"].sum():
        left = df[df["left_out_runs"] > 0]
        out.append("Only each arm's current config counts (the spec's config hash; for arms not in the spec, "
                   "their latest run's). Left out: " +
                   ", ".join(f"{a} ({n} run(s) of {k} older config(s))" for a, n, k in
                             zip(left["arm"], left["left_out_runs"], left["left_out_configs"])) +
                   "; `ablate table --all-configs` shows each config as its own row.")
    if settings.all_configs and "config_hash" in df and df["arm"].str.contains("@", regex=False).any():
        out.append("All configs: a row `arm@hash` holds an arm's runs of a config other than its current one "
                   "(compared with the current baseline).")
    return out


def to_markdown(df: pd.DataFrame, settings: Settings) -> str:
    head = "| " + " | ".join(LAYOUT) + " |"
    align = "|" + "|".join(["---", "---:"] + ["---:"] * 9 + ["---"]) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in display_rows(df, settings.target)]
    text = "\n".join([head, align, *body])
    foot = notes(df, settings)
    return text + ("\n\n" + "\n".join(f"- {n}" for n in foot) if foot else "") + "\n"


def _full(x: Any) -> str:
    """A number at full precision (the shortest text that reads back as the same float); "" for NaN."""
    if x is None:
        return ""
    x = float(x)
    return repr(x) if math.isfinite(x) else ""


def to_csv(df: pd.DataFrame, settings: Settings) -> str:
    """One line per row, every number at full precision (p too: 3.1e-07, not "<0.0001")."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in df.to_dict("records"):
        w.writerow([r["arm"], r.get("config_hash", ""), r["runs"], r.get("diverged", 0), r["failed"],
                    r.get("cancelled", 0), r.get("left_out_runs", 0), _full(r["time_mean"]), _full(r["time_std"]),
                    _full(r["time_delta"]), _full(r["time_p"]), _full(r["loss_mean"]), _full(r["loss_std"]),
                    _full(r["loss_delta"]), _full(r["loss_p"]), _full(r["p_target"]), r["loss_method"],
                    r["verdict"]])
    return buf.getvalue()


def _json_value(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None     # full precision; NaN → null
    return v


def to_json(df: pd.DataFrame, settings: Settings, experiment: str) -> str:
    doc = {"experiment": experiment, **{k: v for k, v in asdict(settings).items() if k != "sequential"},
           "mixed_data": mixed_data(df),
           "sequential": asdict(settings.sequential) if settings.sequential else None,
           "notes": notes(df, settings),
           "arms": [{k: _json_value(v) for k, v in r.items()} for r in df.to_dict("records")]}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _verdict_style(verdict: str) -> str:
    if any(w in verdict for w in ("faster", "lower loss")) and not any(w in verdict for w in ("slower", "higher loss")):
        return "bold green"
    if any(w in verdict for w in ("slower", "higher loss", "diverged")):
        return "bold red"
    return ""


class Fitted:
    """A rich renderable that shows, at render time, the first of its `layouts()` whose tables fit
    the console width (the last one otherwise), so that no number is ever cut ("4.…"). A layout is
    (tables, lines below them); only the tables are measured, the lines wrap on words."""

    def layouts(self) -> list[tuple[list[Any], list[Any]]]:
        raise NotImplementedError

    @staticmethod
    def _width(console, options, parts: list[Any]) -> int:
        from rich.measure import Measurement

        wide = options.update(max_width=100_000)
        return max((Measurement.get(console, wide, p).maximum for p in parts), default=0)

    def __rich_console__(self, console, options):
        layouts = self.layouts()
        for i, (parts, below) in enumerate(layouts):
            if i == len(layouts) - 1 or self._width(console, options, parts) <= options.max_width:
                yield from parts
                yield from below
                return

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        layouts = self.layouts()
        return Measurement(self._width(console, options, layouts[-1][0]), self._width(console, options, layouts[0][0]))


def rich_grid(title: str, head: list[str], rows: list[list[str]], *, bold: list[bool] | None = None,
              left: Iterable[int] = (0,), styles: dict[int, Any] | None = None, compact: bool = False):
    """A rich Table whose cells are plain text (never markup) and never wrap or get cut, except the
    first column, which folds if it must. Columns in `left` are left-aligned, the rest right-aligned;
    `styles` maps a column index to a function cell → style; `bold` marks rows; `compact` drops
    the outer border (4 columns narrower)."""
    from rich.table import Table
    from rich.text import Text

    styles = styles or {}
    # title, headers and cells as Text, never markup: a name, host or note with "[...]" prints as written
    t = Table(title=Text(title) if title else None, show_edge=not compact, pad_edge=not compact)
    for i, name in enumerate(head):
        width = max([len(line) for line in name.split("\n")] + [len(r[i]) for r in rows])
        if i == 0:
            t.add_column(Text(name), overflow="fold")
        else:
            t.add_column(Text(name), justify="left" if i in set(left) else "right", no_wrap=True, min_width=width)
    for k, row in enumerate(rows):
        t.add_row(*[Text(c, style=styles[i](c) if i in styles else "") for i, c in enumerate(row)],
                  style="bold" if bold and bold[k] else None)
    return t


def rich_cards(title: str, head: list[str], rows: list[list[str]], bold: list[bool] | None = None) -> list[Any]:
    """Narrow consoles: one small two-column table per row (its first cell as the title)."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = [Text(title, style="bold")] if title else []
    for k, row in enumerate(rows):
        t = Table(title=Text(row[0], style="bold" if bold and bold[k] else ""), show_header=False,
                  title_justify="left")
        t.add_column(no_wrap=True)
        t.add_column(justify="right", no_wrap=True)
        for name, cell in zip(head[1:], row[1:]):
            t.add_row(Text(name), Text(cell))
        out.append(t)
    return out


class RichTable(Fitted):
    """The results table for a console of any width, numbers never cut: the whole record layout
    when each arm fits on one line; else the numbers with the verdicts listed below the table;
    else a time table and a loss table, verdicts below; on very narrow consoles one small table per
    arm. Notes follow. (`columns` lists the layout's headers.)"""

    def __init__(self, df: pd.DataFrame, settings: Settings, title: str = "") -> None:
        self.rows = display_rows(df, settings.target)
        self.baseline = [bool(r["is_baseline"]) for r in df.to_dict("records")]
        self.notes = notes(df, settings)
        self.title = title
        self.target = settings.target is not None
        self.columns = list(LAYOUT)

    def _pick(self, cols: list[int]) -> tuple[list[str], list[list[str]]]:
        return [LAYOUT[i] for i in cols], [[row[i] for i in cols] for row in self.rows]

    def _table(self, cols: list[int], title: str | None = None):
        head, rows = self._pick(cols)
        verdict = [cols.index(11)] if 11 in cols else []
        return rich_grid(self.title if title is None else title, head, rows, bold=self.baseline,
                         left=[0, *verdict], styles={i: _verdict_style for i in verdict})

    def layouts(self) -> list[tuple[list[Any], list[Any]]]:
        from rich.text import Text

        target = [10] if self.target else []
        numbers = list(range(1, 10)) + target
        notes = [Text(n, style="dim") for n in self.notes]
        below = [Text.assemble((f"{row[0]}: ", "bold"), (row[11], _verdict_style(row[11]))) for row in self.rows]
        return [([self._table(list(range(12)))], notes),
                ([self._table([0] + numbers)], below + notes),
                ([self._table([0, 1, 2, 3, 4, 5], f"{self.title}: time (s)".lstrip(": ")),
                  self._table([0, 6, 7, 8, 9] + target, f"{self.title}: loss".lstrip(": "))], below + notes),
                (rich_cards(self.title, *self._pick([0] + numbers), self.baseline), below + notes)]


def to_rich(df: pd.DataFrame, settings: Settings, experiment: str) -> RichTable:
    return RichTable(df, settings, f"{experiment} (MIXED DATA SOURCES)" if mixed_data(df) else experiment)


def format_table(df: pd.DataFrame, settings: Settings, fmt: str = "rich", experiment: str = ""):
    """Render an analysed table: a rich renderable (RichTable) for "rich", a str for md/csv/json."""
    if fmt == "md":
        return to_markdown(df, settings)
    if fmt == "csv":
        return to_csv(df, settings)
    if fmt == "json":
        return to_json(df, settings, experiment)
    if fmt == "rich":
        return to_rich(df, settings, experiment)
    raise AnalysisError(f"format={fmt!r} is not one of {', '.join(FORMATS)}; fix: --format md")


def analyse(exp: Experiment, baseline: str | None = None, target: float | None = None,
            all_configs: bool = False) -> tuple[pd.DataFrame, Settings]:
    """The table of a plain experiment (its runs other than search suggestions) and its settings."""
    runs = exp.runs
    if "source" in runs.columns:  # search suggestions are listed by search_table, not compared here
        runs = runs[runs["source"] != "search"]
    if runs.empty:
        raise exp.no_runs()
    settings = exp.settings(baseline, target, all_configs)
    return table_from_runs(runs, settings, exp.current), settings

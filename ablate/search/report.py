"""`ablate table` for a search experiment: the trial listing, then the confirmation's table.

    ablate table lr_mul_search                      # ablate.cli.results calls search_table for search specs
    from ablate.search.report import search_table
    from ablate.analysis.tables import read_experiment
    print(search_table(read_experiment(Store("results"), "lr_mul_search_tiny"), fmt="md"))

The listing has one row per Optuna trial (suggestion): number, state, the searched parameters,
n (seeds that finished ok), mean and std of val loss (and of train time in s for two
objectives), a `*` on the Pareto front (two objectives) and `✓` on the suggestions sent to the
confirmation. Values come from the runs as the command read them once (ablate.analysis.tables.Experiment:
source "search" runs), states from the Optuna study when its storage can be opened. Complete
trials come first, best mean loss first.
The confirmation runs (source "ablate": the spec's arms and `t<number>` arms on fresh seeds) get
the ordinary significance table of ablate.analysis.tables.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from ablate.analysis import tables
from ablate.spec.search_space import ChoiceParam, SearchConfig
from ablate.search.study import ATTR_CONFIRMED, ATTR_INTERRUPTED, SEARCH_INFO, pareto_mask


def is_search_experiment(exp: tables.Experiment) -> bool:
    """True when the experiment's spec has a `search:` block."""
    return bool(exp.spec.search)


def _config(exp: tables.Experiment) -> SearchConfig:
    try:
        return SearchConfig.model_validate(exp.spec.search)
    except ValidationError as e:
        raise tables.AnalysisError(f"the stored spec's search block is invalid ({e.error_count()} problems); "
                                   "fix: `ablate validate` the spec and run it again") from None


def _study(store: Any, experiment: str):
    """The Optuna study, or None when its storage cannot be reached from here."""
    raw = store.read_bytes(experiment, SEARCH_INFO)
    if not raw:
        return None
    info = json.loads(raw)
    url = info.get("storage", "")
    if url.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(url.removeprefix("sqlite:///")).exists():
            return None
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=info["study_name"], storage=url)
    except Exception:  # noqa: BLE001 (a table without study states is still useful)
        return None


def trial_rows(runs: pd.DataFrame, cfg: SearchConfig, study: Any = None) -> pd.DataFrame:
    """One row per trial: number, state, params, n, loss/time mean and std, pareto, confirmed."""
    search = runs[runs["source"] == "search"] if len(runs) else runs
    by_number: dict[int, dict[str, Any]] = {}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)} if study is not None else {}
    confirmed = set(study.user_attrs.get(ATTR_CONFIRMED, [])) if study is not None else set()
    if len(runs):
        conf = runs[(runs["source"] != "search") & runs["search_trial"].notna()]
        confirmed |= {int(x) for x in conf["search_trial"]}
    numbers = sorted(set(trials) | {int(x) for x in search["search_trial"].dropna()})
    for n in numbers:
        mine = search[search["search_trial"] == n]
        ok = mine[mine["status"] == "ok"].drop_duplicates(["arm", "seed"])
        row: dict[str, Any] = {"trial": n}
        t = trials.get(n)
        if t is not None:
            state = t.state.name
            if state == "FAIL" and t.user_attrs.get(ATTR_INTERRUPTED):
                state = "INTERRUPTED"
            params = t.params
            try:
                params = cfg.to_overrides(params)
            except Exception:  # noqa: BLE001 (a trial with partial params)
                pass
        else:
            state = "COMPLETE" if len(ok) >= cfg.seeds_per_trial else (
                "FAIL" if mine["status"].isin(["failed", "diverged"]).any() else "INCOMPLETE")
            params = json.loads(mine["overrides_json"].iloc[0]) if len(mine) else {}
        row["state"] = state
        for key in cfg.space:
            row[key] = params.get(key)
        row["n"] = len(ok)
        for name, col, scale in (("loss", "final_val_loss", 1.0), ("time", "train_time_ms", 1e-3)):
            vals = ok[col].astype(float).to_numpy() * scale
            row[f"{name}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{name}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        row["confirmed"] = n in confirmed
        by_number[n] = row
    df = pd.DataFrame(list(by_number.values()))
    if df.empty:
        return df
    complete = (df["state"] == "COMPLETE").to_numpy()
    df["pareto"] = False
    if cfg.multi_objective and complete.any():
        pts = df.loc[complete, ["loss_mean", "time_mean"]].to_numpy(float)
        df.loc[complete, "pareto"] = pareto_mask(pts)
    df["_done"] = ~complete
    df = df.sort_values(["_done", "loss_mean", "trial"], na_position="last", kind="stable")
    return df.drop(columns="_done").reset_index(drop=True)


def _short(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 1 and parts[-2] in ("lr_mul", "wd_mul", "adam", "muon", "variance_norm", "synth"):
        return ".".join(parts[-2:])
    return parts[-1]


def _cell(v: Any, param: Any = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(str(x) for x in v) + ")"
    if isinstance(param, ChoiceParam):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _display(df: pd.DataFrame, cfg: SearchConfig) -> tuple[list[str], list[list[str]]]:
    head = ["Trial", "State"] + [_short(k) for k in cfg.space] + ["n", "Loss μ", "Loss σ"]
    if cfg.multi_objective:
        head += ["Time μ", "Time σ", "Pareto"]
    head += ["Confirmed"]
    rows = []
    for r in df.to_dict("records"):
        cells = [f"t{r['trial']}", r["state"]] + [_cell(r[k], p) for k, p in cfg.space.items()]
        cells += [str(r["n"]), tables._num(r["loss_mean"], ".4f"), tables._num(r["loss_std"], ".4f")]
        if cfg.multi_objective:
            cells += [tables._num(r["time_mean"], ".4f"), tables._num(r["time_std"], ".4f"),
                      "*" if r["pareto"] else ""]
        cells += ["✓" if r["confirmed"] else ""]
        rows.append(cells)
    return head, rows


def _notes(df: pd.DataFrame, cfg: SearchConfig) -> list[str]:
    done = int((df["state"] == "COMPLETE").sum()) if len(df) else 0
    out = [f"{done} of {cfg.trials} suggestions complete; sampler {cfg.sampler} (seed {cfg.sampler_seed}); "
           f"each on seeds 0..{cfg.seeds_per_trial - 1}; μ/σ over the seeds that finished ok (Time in s)."]
    if cfg.multi_objective:
        out.append("Pareto (*): no other complete suggestion has both lower mean loss and lower mean time.")
    out.append("These means select candidates; they are not tests. The confirmation table below re-runs "
               "the chosen ones (✓) on fresh seeds next to the baseline.")
    return out


class TrialListing(tables.Fitted):
    """The trial listing for a console of any width, numbers never cut: one table when it fits;
    else the outcomes (trial, state, n, μ, σ, ...) and the parameters as two tables; else one
    small table per trial."""

    def __init__(self, title: str, head: list[str], rows: list[list[str]], bold: list[bool], n_params: int,
                 notes: list[str]) -> None:
        self.title, self.head, self.rows, self.bold, self.notes = title, head, rows, bold, notes
        self.params = list(range(2, 2 + n_params))

    def _grid(self, cols: list[int], title: str, narrow: bool = False):
        """`narrow`: parameter headers on two lines ("lr_mul." / "attn"), no outer border."""
        head = [self.head[i].rsplit(".", 1)[0] + ".\n" + self.head[i].rsplit(".", 1)[1]
                if narrow and i in self.params and "." in self.head[i] else self.head[i] for i in cols]
        return tables.rich_grid(title, head, [[r[i] for i in cols] for r in self.rows],
                                bold=self.bold, left=[0, 1] if 1 in cols else [0], compact=narrow)

    def layouts(self) -> list[tuple[list[Any], list[Any]]]:
        from rich.text import Text

        notes = [Text(n, style="dim") for n in self.notes]
        every = list(range(len(self.head)))
        outcome = [i for i in every if i not in self.params]
        return [([self._grid(every, self.title)], notes),
                ([self._grid(every, self.title, narrow=True)], notes),
                ([self._grid(outcome, self.title), self._grid([0, *self.params], "parameters", True)], notes),
                (tables.rich_cards(self.title, self.head, self.rows, self.bold), notes)]


def search_table(exp: tables.Experiment, fmt: str = "rich", baseline: str | None = None,
                 target: float | None = None, all_configs: bool = False) -> Any:
    """Trial listing + confirmation table: a rich Group for "rich", a str for md/csv/json.
    `baseline` / `target` / `all_configs` apply to the confirmation table, as in `ablate table`."""
    if fmt not in tables.FORMATS:
        raise tables.AnalysisError(f"format={fmt!r} is not one of {', '.join(tables.FORMATS)}; fix: --format md")
    experiment = exp.name
    if not is_search_experiment(exp):
        raise tables.AnalysisError(f"experiment {experiment!r} is not a search experiment (no search: block in "
                                   "its stored spec.yaml); fix: use the plain `ablate table`")
    cfg = _config(exp)
    runs = exp.runs
    df = trial_rows(runs, cfg, _study(exp.store, experiment))
    conf_runs = runs[runs["source"] != "search"] if len(runs) else runs
    settings = replace(exp.settings(baseline, target, all_configs), sequential=None)  # a fixed design
    conf = tables.table_from_runs(conf_runs, settings, exp.current) if len(conf_runs) else pd.DataFrame()
    head, rows = _display(df, cfg) if len(df) else ([], [])
    notes = _notes(df, cfg)
    title = f"{experiment}: search trials"
    if fmt == "rich":
        from rich.console import Group
        from rich.text import Text

        bold = [bool(r["pareto"] or r["confirmed"]) for r in df.to_dict("records")]
        parts: list[Any] = [TrialListing(title, head, rows, bold, len(cfg.space), notes)]
        parts.append(tables.format_table(conf, settings, "rich", f"{experiment}: confirmation") if len(conf)
                     else Text("No confirmation runs yet (confirm: in the spec runs them after the search)."))
        return Group(*parts)
    if fmt == "md":
        md = [f"### {title}", ""]
        if head:
            md += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
            md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
        md += [""] + [f"- {n}" for n in notes] + ["", f"### {experiment}: confirmation", ""]
        md.append(tables.to_markdown(conf, settings) if len(conf) else "No confirmation runs yet.\n")
        return "\n".join(md)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = ["trial", "state", *cfg.space, "n", "loss_mean", "loss_std", "time_mean", "time_std",
                "pareto", "confirmed"]
        w.writerow(cols)
        for r in df.to_dict("records"):
            w.writerow([json.dumps(r[c]) if isinstance(r[c], (list, tuple)) else
                        ("" if isinstance(r[c], float) and not math.isfinite(r[c]) else r[c]) for c in cols])
        return buf.getvalue() + ("\n" + tables.to_csv(conf, settings) if len(conf) else "")
    doc = {"experiment": experiment, "objectives": cfg.objectives, "notes": notes,
           "trials": [{k: tables._json_value(v) for k, v in r.items()} for r in df.to_dict("records")],
           "confirmation": json.loads(tables.to_json(conf, settings, experiment)) if len(conf) else None}
    return json.dumps(doc, indent=2, ensure_ascii=False, default=_jsonable) + "\n"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, tuple):
        return list(v)
    return str(v)

"""Sequential (adaptive) seeds: which arms need another round, and what each comparison decided.

    python benchmarks/bench_sequential.py            # error rate and runs saved, by simulation

With `seeds: {min: 3, max: 16, alpha: 0.01}` the orchestrator runs `min` seeds per arm, then
one round at a time, and after each round calls `arms_to_continue(runs, spec)`. An arm keeps
running while any of its comparisons is undecided (and it has fewer than `max` ok runs):

* loss vs the baseline arm and time vs the baseline arm (Welch, or paired when the blocked
  analysis applies; one- or two-sided as `analysis.alternative` says);
* loss below `target_loss` (one-sided, the speedrun rule's direction), when a target is set.

Each comparison is a group-sequential test with Lan–DeMets alpha spending and non-binding
futility (`ablate/analysis/group_sequential.py`); looks are the rounds, information = runs / `max`. The
baseline keeps running while any other arm does (it is their comparator). docs/statistics.md
says why this procedure and how the p-values in the table are computed afterwards.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats as sps

from ablate.analysis import stats
from ablate.spec.model import Spec
from ablate.analysis.group_sequential import Design, decide, design, orient, sequential_pvalue, z_from_t

METRICS = {"loss": "final_val_loss", "time": "time_s"}


@dataclass(frozen=True)
class SeqPlan:
    """What the sequential procedure needs from a spec (`plan_from_spec`; no defaults here: the
    spec's model holds them)."""

    min: int
    max: int
    alpha: float
    baseline: str
    target: float | None
    alternative: str

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.max:
            raise ValueError(f"seeds min={self.min}, max={self.max}: need 1 ≤ min ≤ max")
        if not 0 < self.alpha < 1:
            raise ValueError(f"seeds alpha={self.alpha} must be in (0, 1)")
        stats.check_alternative(self.alternative)


def plan_from_spec(spec: Spec, baseline: str | None = None, target: float | None = None) -> SeqPlan | None:
    """SeqPlan from the spec (ablate.spec.model.Spec, parsed by the model); None when its seeds are not
    sequential. `baseline` / `target` replace the spec's (the table's --baseline / --target)."""
    if not spec.sequential:
        return None
    seeds = spec.seeds
    return SeqPlan(seeds.min, seeds.max, seeds.alpha,  # type: ignore[union-attr]
                   baseline=baseline or spec.baseline,
                   target=spec.target_loss if target is None else target,
                   alternative=spec.analysis.alternative)


# ---------------------------------------------------------------- looks

@dataclass
class Look:
    round: int
    n: int                      # ok runs of the arm so far
    fraction: float             # information fraction of the loss/time comparisons
    target_fraction: float      # information fraction of the target comparison
    z: dict[str, float] = field(default_factory=dict)   # oriented z per comparison


@dataclass(frozen=True)
class Outcome:
    """What one comparison of one arm decided: at which look, with what sequential p."""

    arm: str
    comparison: str             # "loss" | "time" | "target"
    decision: str               # "efficacy" | "futility" | "continue"
    look: int                   # index into the arm's looks (-1: no look yet)
    n: int
    p: float


def _ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[runs["status"] == "ok"].copy()
    ok["time_s"] = ok["train_time_ms"] / 1000.0
    return ok


def _compare(a: pd.DataFrame, b: pd.DataFrame, alternative: str) -> tuple[dict[str, float], int]:
    """Oriented z for loss and time, and the comparison's effective n (pairs or harmonic mean)."""
    pairs = stats.pair_runs(a, b)
    out = {}
    for name, col in METRICS.items():
        if pairs is not None:
            c = stats.paired(a.loc[pairs[0], col], b.loc[pairs[1], col], "two-sided")
        else:
            c = stats.welch(a[col], b[col], "two-sided")
        z = float(z_from_t(c.stat, c.df)) if math.isfinite(c.stat) else (
            math.copysign(math.inf, c.delta) if c.delta else 0.0)
        out[name] = float(orient(z, alternative))
    n_eff = len(pairs[0]) if pairs is not None else 2.0 / (1.0 / len(a) + 1.0 / len(b))
    return out, n_eff


def target_z(losses: pd.Series, target: float) -> float:
    """z of the one-sample t statistic (target − mean)/SE: the speedrun rule's
    scipy.stats.ttest_1samp(losses, target), sign flipped so that positive means below the target.
    Zero variance gives ±inf (0 at the target), where scipy would give NaN."""
    x = losses.to_numpy(dtype=float)
    if x.std(ddof=1) == 0:
        return math.copysign(math.inf, target - x.mean()) if x.mean() != target else 0.0
    res = sps.ttest_1samp(x, target)
    return float(z_from_t(-res.statistic, res.df))


def arm_looks(runs: pd.DataFrame, arm: str, plan: SeqPlan) -> list[Look]:
    """The looks of one arm: one per round (of that arm) that added ok runs, once n ≥ min."""
    ok = _ok_runs(runs)
    rounds = sorted(runs.loc[runs["arm"] == arm, "round"].dropna().unique())
    looks: list[Look] = []
    first = max(plan.min, 2)
    for r in rounds:
        a = ok[(ok["arm"] == arm) & (ok["round"] <= r)]
        n = len(a)
        if n < first:
            continue
        z: dict[str, float] = {}
        frac = math.nan
        if arm != plan.baseline:
            b = ok[(ok["arm"] == plan.baseline) & (ok["round"] <= r)]
            if len(b) >= 2:
                z, n_eff = _compare(a, b, plan.alternative)
                frac = 1.0 if n >= plan.max else min(1.0, n_eff / plan.max)
        tfrac = math.nan
        if plan.target is not None:
            z["target"] = target_z(a["final_val_loss"], plan.target)
            tfrac = min(1.0, n / plan.max)
        looks.append(Look(int(r), n, frac, tfrac, z))
    return looks


@functools.lru_cache(maxsize=256)
def _design(fractions: tuple[float, ...], alpha: float, alternative: str) -> Design:
    return design(list(fractions), alpha, alternative)


def _increasing(values: list[float]) -> list[int]:
    """Indices of looks whose information strictly increased (others are not new looks)."""
    keep, last = [], 0.0
    for i, v in enumerate(values):
        if math.isfinite(v) and v > last + 1e-12:
            keep.append(i)
            last = v
    return keep


def comparison_outcome(looks: list[Look], arm: str, comparison: str, plan: SeqPlan) -> Outcome:
    """Walk the looks in order; the comparison is decided at its first efficacy/futility look."""
    frac_of = (lambda lk: lk.target_fraction) if comparison == "target" else (lambda lk: lk.fraction)
    alternative = "greater" if comparison == "target" else plan.alternative
    idx = [i for i in _increasing([frac_of(lk) for lk in looks]) if comparison in looks[i].z]
    if not idx:
        return Outcome(arm, comparison, "continue", -1, looks[-1].n if looks else 0, math.nan)
    fr = tuple(round(frac_of(looks[i]), 12) for i in idx)
    d = _design(fr, plan.alpha, alternative)
    for k, i in enumerate(idx):
        z = looks[i].z[comparison]
        dec = str(decide(z, k, d))
        if dec != "continue" or k == len(idx) - 1:
            p = sequential_pvalue(z, k, fr, plan.alpha, alternative) if math.isfinite(z) else (
                0.0 if (z > 0 or alternative == "two-sided") else 1.0)
            return Outcome(arm, comparison, dec, i, looks[i].n, p)
    raise AssertionError("unreachable")  # the loop always returns at its last index


def comparisons(arm: str, plan: SeqPlan) -> list[str]:
    out = [] if arm == plan.baseline else ["loss", "time"]
    return out + (["target"] if plan.target is not None else [])


def arm_outcomes(runs: pd.DataFrame, plan: SeqPlan) -> dict[tuple[str, str], Outcome]:
    """Outcome of every (arm, comparison) of the experiment (the table's sequential p-values)."""
    out = {}
    for arm in _arms_in_order(runs, plan.baseline):
        looks = arm_looks(runs, arm, plan)
        for c in comparisons(arm, plan):
            out[(arm, c)] = comparison_outcome(looks, arm, c, plan)
    return out


def _arms_in_order(runs: pd.DataFrame, baseline: str) -> list[str]:
    if runs.empty:
        return []
    key = "order" if "order" in runs else None
    firsts = runs.groupby("arm")[key].min().sort_values(kind="mergesort") if key else runs.groupby("arm").size()
    arms = list(firsts.index)
    return ([baseline] if baseline in arms else []) + [a for a in arms if a != baseline]


def arms_to_continue_plan(runs: pd.DataFrame, plan: SeqPlan) -> list[str]:
    """`arms_to_continue` for an explicit SeqPlan."""
    ok_n = _ok_runs(runs).groupby("arm").size()
    keep: list[str] = []
    for arm in _arms_in_order(runs, plan.baseline):
        if arm == plan.baseline:
            continue
        n = int(ok_n.get(arm, 0))
        if n >= plan.max:
            continue
        if n < plan.min:
            keep.append(arm)
            continue
        looks = arm_looks(runs, arm, plan)
        if any(comparison_outcome(looks, arm, c, plan).decision == "continue" for c in comparisons(arm, plan)):
            keep.append(arm)
    base = plan.baseline
    if base in set(runs["arm"]):
        n = int(ok_n.get(base, 0))
        needed = bool(keep) and n < plan.max
        if n < plan.min:
            needed = True
        elif plan.target is not None and n < plan.max:
            looks = arm_looks(runs, base, plan)
            needed = needed or comparison_outcome(looks, base, "target", plan).decision == "continue"
        if needed:
            keep.insert(0, base)
    return keep


def arms_to_continue(runs: pd.DataFrame, spec: Spec) -> list[str]:
    """Arms that need another round of seeds, baseline first; [] when everything is decided.

    `runs` is the store's runs frame of the experiment (every status); `spec` the ExperimentSpec
    with sequential seeds. Only runs with status "ok" count; an arm below `min` ok runs always
    continues, one at `max` never does. An experiment with only a baseline and no target has
    nothing to decide and stops at `min`.
    """
    plan = plan_from_spec(spec)
    if plan is None:
        raise ValueError("arms_to_continue needs sequential seeds, e.g. seeds: {min: 3, max: 16, alpha: 0.01}; "
                         f"this spec has seeds={getattr(spec, 'seeds', None)!r}")
    return arms_to_continue_plan(runs, plan)


# ---------------------------------------------------------------- simulation (benchmark, tests)

def welch_z(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Welch z (t mapped to z) of rows of a vs rows of b: scipy.stats.ttest_ind(equal_var=False), row-wise."""
    res = sps.ttest_ind(a, b, axis=1, equal_var=False)
    return z_from_t(res.statistic, res.df)


@dataclass
class SimResult:
    """Per simulated experiment: decisions and the runs per arm it used."""

    runs_per_arm: np.ndarray            # (n_experiments,)
    rejected: dict[str, np.ndarray]     # comparison → bool (efficacy reached)
    fixed_rejected: dict[str, np.ndarray]   # fixed design at max runs, Welch at alpha


def simulate(n_experiments: int, plan: SeqPlan, deltas: Mapping[str, float], sds: Mapping[str, float],
             rng: np.random.Generator, round_size: int = 1) -> SimResult:
    """Simulate baseline-vs-one-arm experiments under the sequential rule (Welch, no failures).

    Both arms draw N(delta, sd) per comparison (loss, time; baseline delta 0); the arm runs
    `min` seeds then `round_size` per round and stops once every comparison is decided or at
    `max`. The same draws at `max` runs give the fixed design's decisions for comparison.
    """
    base = {c: rng.normal(0.0, sds[c], size=(n_experiments, plan.max)) for c in deltas}
    arm = {c: rng.normal(deltas[c], sds[c], size=(n_experiments, plan.max)) for c in deltas}
    return simulate_draws(base, arm, plan, round_size)


def simulate_draws(base: Mapping[str, np.ndarray], arm: Mapping[str, np.ndarray], plan: SeqPlan,
                   round_size: int = 1) -> SimResult:
    """The sequential rule on given draws: arrays (experiments × max) per comparison."""
    names = list(base)
    n_experiments = next(iter(base.values())).shape[0]
    ns = list(range(plan.min, plan.max, round_size)) + [plan.max]
    d = design([n / plan.max for n in ns], plan.alpha, plan.alternative)
    active = np.ones(n_experiments, bool)
    decided = {c: np.zeros(n_experiments, bool) for c in names}
    rejected = {c: np.zeros(n_experiments, bool) for c in names}
    used = np.full(n_experiments, plan.max)
    for k, n in enumerate(ns):
        for c in names:
            z = orient(welch_z(arm[c][:, :n], base[c][:, :n]), plan.alternative)
            dec = decide(z, k, d)
            new = active & ~decided[c] & (dec != "continue")
            rejected[c] |= new & (dec == "efficacy")
            decided[c] |= new
        stop = active & np.logical_and.reduce([decided[c] for c in names])
        used[stop] = n
        active &= ~stop
    crit = float(sps.norm.isf(plan.alpha / 2 if plan.alternative == "two-sided" else plan.alpha))
    fixed = {}
    for c in names:   # fixed design: Welch at `max` runs (t mapped to z, same decision as the t-test)
        z = orient(welch_z(arm[c], base[c]), plan.alternative)
        fixed[c] = (np.abs(z) if plan.alternative == "two-sided" else z) >= crit
    return SimResult(used, rejected, fixed)

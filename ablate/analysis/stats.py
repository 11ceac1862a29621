"""Per-arm statistics for the results table: summaries, Welch/paired comparisons, Hedges g,
the speedrun target rule, multiple-comparison corrections and runs-needed estimates.

    python -m pytest tests/ablate/test_stats.py tests/ablate/test_stats_library.py -q

Pure functions of numbers (numpy arrays) plus `pair_runs`, which reads the runs frame's
`order`/`round`/`seed`/`hostname`/`gpu_uuids` columns to form blocks. Library calls where a
library gives the table's numbers: scipy.stats for every distribution and the target rule
(`t.ppf`/`t.sf`/`t.cdf`, `nct`, `ttest_1samp`), statsmodels' `multipletests` for BH. The rest
are thin wrappers, each docstring saying why: `welch`/`paired` (scipy's `ttest_ind(equal_var=
False)`/`ttest_rel` and `confidence_interval` numbers, from numpy moments so that the
full-precision tables stay byte-identical), Holm (statsmodels' runs gc.collect() per call),
`hedges_g` (exact J), `t_power`/`runs_needed*` (statsmodels' power is NaN at large
noncentrality and has no unequal-variance Welch sample size). docs/statistics.md names the
library function behind every column; tests/ablate/test_stats_library.py pins each wrapper to
the library and to the hand-written formulas it replaced.
Conventions: Δ = mean(arm) − mean(baseline); "less" means the arm is lower (better) than the
baseline; CIs are two-sided at `confidence` unless the alternative is one-sided.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats
from statsmodels.stats.multitest import multipletests

ALTERNATIVES = ("two-sided", "less", "greater")
CORRECTIONS = ("holm", "bh", "none")
TARGET_ALPHA = 0.01          # the speedrun's record rule: p < 0.01 that mean loss < target
MIN_PAIRS = 3                # blocked analysis needs at least this many complete pairs ...
MIN_PAIR_COVERAGE = 2 / 3    # ... covering at least this share of the smaller arm's ok runs
MAX_RUNS_NEEDED = 10_000     # runs_needed gives up (None) beyond this


def _arr(x) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    return a[np.isfinite(a)]


def check_alternative(alternative: str) -> str:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r} is not allowed; use one of {', '.join(ALTERNATIVES)}")
    return alternative


def check_correction(correction: str) -> str:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction={correction!r} is not allowed; use one of {', '.join(CORRECTIONS)}")
    return correction


# ---------------------------------------------------------------- one arm

@dataclass(frozen=True)
class Summary:
    """n, mean, sample std (ddof 1), standard error and t-based CI of the mean."""

    n: int
    mean: float
    std: float
    se: float
    ci_low: float
    ci_high: float


def ci_half_width(std, n, confidence: float = 0.95):
    """Half-width of the t-based confidence interval of a mean, t(n−1)·std/√n; NaN where n < 2.
    Elementwise over arrays (per-step bands in plots) as over numbers."""
    n_arr = np.asarray(n, dtype=float)
    tq = np.where(n_arr > 1, stats.t.ppf(0.5 + confidence / 2, np.maximum(n_arr - 1, 1)), np.nan)
    half = tq * (np.asarray(std, dtype=float) / np.sqrt(np.maximum(n_arr, 1)))  # t·se, summarize's order
    return float(half) if np.ndim(half) == 0 else half


def summarize(x, confidence: float = 0.95) -> Summary:
    """Summary of the finite values of x; std/se/CI are NaN below two values."""
    a = _arr(x)
    n = len(a)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(a.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = float(a.std(ddof=1))
    se = std / math.sqrt(n)
    half = ci_half_width(std, n, confidence)
    return Summary(n, mean, std, se, mean - half, mean + half)


# ---------------------------------------------------------------- arm vs baseline

@dataclass(frozen=True)
class Comparison:
    """Arm − baseline: Δ, its CI (one-sided bounds are ±inf), p, Hedges g, test used."""

    delta: float
    ci_low: float
    ci_high: float
    p: float
    g: float
    df: float
    stat: float
    method: str          # "welch" | "paired"
    n_pairs: int = 0


_NAN_CMP = dict(delta=math.nan, ci_low=math.nan, ci_high=math.nan, p=math.nan, g=math.nan,
                df=math.nan, stat=math.nan)


def _t_test(delta: float, se: float, df: float, alternative: str, confidence: float, g: float,
            method: str, n_pairs: int = 0) -> Comparison:
    """t = Δ/SE on `df` degrees of freedom: p from scipy.stats.t's tails, CI Δ ± t.ppf · SE
    (one-sided: the other bound is ±inf), what ttest_ind/ttest_rel and their confidence_interval
    compute from the same Δ, SE and df."""
    t = delta / se
    if alternative == "two-sided":
        p = float(2 * stats.t.sf(abs(t), df))
        h = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
        lo, hi = delta - h, delta + h
    else:
        h = float(stats.t.ppf(confidence, df)) * se
        p = float(stats.t.cdf(t, df) if alternative == "less" else stats.t.sf(t, df))
        lo, hi = (-math.inf, delta + h) if alternative == "less" else (delta - h, math.inf)
    return Comparison(delta, float(lo), float(hi), p, g, float(df), float(t), method, n_pairs)


def hedges_g(arm, base) -> float:
    """(mean_arm − mean_base) / pooled sd, times the exact small-sample factor J(df).

    J(df) = Γ(df/2) / (sqrt(df/2) Γ((df−1)/2)), df = n_arm + n_base − 2.
    A wrapper because no library has it exactly: statsmodels' `effectsize_smd` uses the
    approximation J ≈ 1 − 3/(4(n_a + n_b) − 9) (0.2 % off at 6 + 7 runs), scipy has no Hedges g.
    """
    a, b = _arr(arm), _arr(base)
    na, nb = len(a), len(b)
    df = na + nb - 2
    if na < 1 or nb < 1 or df < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * a.var(ddof=1 if na > 1 else 0) + (nb - 1) * b.var(ddof=1 if nb > 1 else 0)) / df)
    if pooled == 0:
        return math.nan
    j = math.exp(special.gammaln(df / 2) - special.gammaln((df - 1) / 2)) / math.sqrt(df / 2)
    return float(j * (a.mean() - b.mean()) / pooled)


def welch(arm, base, alternative: str = "two-sided", confidence: float = 0.95) -> Comparison:
    """Welch's unequal-variance t-test of arm vs base with the Welch–Satterthwaite df.

    The numbers of scipy.stats.ttest_ind(arm, base, equal_var=False, alternative=...) and its
    confidence_interval(confidence), to 1e-12 (tests/ablate/test_stats_library.py). A wrapper
    because scipy's sample variance (second moment × n/(n−1)) differs from numpy's var(ddof=1)
    in the last bit, which the full-precision CSV/JSON tables (and their golden files) would show;
    and for its edge cases: NaN/inf values are dropped, fewer than 2 values per arm give NaN
    statistics with Δ kept, zero variance in both arms gives p = 1 with Δ = 0 (scipy: NaN) and
    p = 0 with a zero-width CI otherwise (scipy: t = ±inf, p = 0).
    """
    check_alternative(alternative)
    a, b = _arr(arm), _arr(base)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        d = float(a.mean() - b.mean()) if na and nb else math.nan
        return Comparison(**{**_NAN_CMP, "delta": d}, method="welch")
    va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
    delta = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    g = hedges_g(a, b)
    if se == 0:
        return Comparison(delta, delta, delta, 1.0 if delta == 0 else 0.0, g, math.nan, math.nan, "welch")
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    return _t_test(delta, se, df, alternative, confidence, g, "welch")


def paired(arm, base, alternative: str = "two-sided", confidence: float = 0.95) -> Comparison:
    """Paired t-test on aligned pairs (arm[i], base[i]); g is the two-sample Hedges g.

    The numbers of scipy.stats.ttest_rel(arm, base, alternative=...) and its
    confidence_interval(confidence), to 1e-12; a wrapper for the same reasons as `welch`
    (last-bit variance, edge cases: pairs with a NaN/inf side are dropped, < 2 pairs or zero
    variance of the differences as in `welch`) and to count the pairs used.
    """
    check_alternative(alternative)
    a = np.asarray(arm, dtype=float).ravel()
    b = np.asarray(base, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired: arm has {a.size} values and base {b.size}; pairs must align")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    g = hedges_g(a[keep], b[keep])
    if n < 2:
        return Comparison(**{**_NAN_CMP, "delta": float(d.mean()) if n else math.nan}, method="paired", n_pairs=n)
    delta = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return Comparison(delta, delta, delta, 1.0 if delta == 0 else 0.0, g, n - 1, math.nan, "paired", n)
    return _t_test(delta, se, n - 1, alternative, confidence, g, "paired", n)


def target_pvalue(losses, target: float) -> float:
    """The speedrun rule, exactly: ttest_1samp(losses, target, alternative="less").pvalue."""
    a = _arr(losses)
    if len(a) < 2:
        return math.nan
    return float(stats.ttest_1samp(a, target, alternative="less").pvalue)


# ---------------------------------------------------------------- several arms

def adjust_pvalues(pvalues, method: str = "holm") -> np.ndarray:
    """Holm step-down (FWER) or Benjamini–Hochberg step-up (FDR) adjusted p-values of the finite
    p-values; NaNs pass through untouched and stay out of the family (multipletests would
    propagate them). BH is statsmodels' multipletests(method="fdr_bh"). Holm is written out
    (min(1, running max of (m − i)·p₍ᵢ₎)) because multipletests(method="holm") runs gc.collect()
    on every call, 0.1–0.3 s in an ablate process; it equals multipletests bit for bit (tested)."""
    check_correction(method)
    out = np.array(pvalues, dtype=float)
    ok = np.isfinite(out)
    m = int(ok.sum())
    if method == "bh" and m:
        out[ok] = multipletests(out[ok], method="fdr_bh")[1]
    elif method == "holm" and m:
        order = np.argsort(out[ok], kind="mergesort")
        adjusted = np.empty(m)
        adjusted[order] = np.minimum(np.maximum.accumulate(out[ok][order] * np.arange(m, 0, -1)), 1.0)
        out[ok] = adjusted
    return out


# ---------------------------------------------------------------- runs needed

def _smallest_n(power_at, power: float, n_normal: float) -> int | None:
    """Smallest n ≥ 2 with power_at(n) ≥ power, searched upwards from just below the normal
    approximation (the noncentral t is only evaluated near the answer, where it is accurate).
    Not statsmodels' solve_power: it root-finds a real n on statsmodels' power, which is NaN at
    large noncentrality (`t_power`); the answer here is an integer by construction."""
    if not math.isfinite(n_normal) or n_normal > MAX_RUNS_NEEDED:
        return None
    n = max(2, int(math.floor(n_normal)) - 2)
    while n > 2 and power_at(n - 1) >= power:
        n -= 1
    while power_at(n) < power:
        n += 1
        if n > MAX_RUNS_NEEDED:
            return None
    return n


def _normal_n(delta: float, var_sum: float, alpha: float, power: float, alternative: str) -> float:
    z_a = stats.norm.isf(alpha / 2 if alternative == "two-sided" else alpha)
    return (z_a + stats.norm.ppf(power)) ** 2 * var_sum / delta ** 2


def _undetectable(delta: float, spread: float, alternative: str) -> bool:
    """No n helps: Δ is 0/NaN, the spread is 0/NaN, or Δ points away from a one-sided alternative."""
    if not (math.isfinite(delta) and math.isfinite(spread)) or delta == 0 or spread == 0:
        return True
    return (alternative == "less" and delta > 0) or (alternative == "greater" and delta < 0)


def t_power(nc: float, df: float, alpha: float, alternative: str = "two-sided") -> float:
    """P(reject at level alpha) when the t statistic is noncentral t(df, nc): scipy.stats.nct's
    tails beyond scipy.stats.t's critical values, the formula of statsmodels' ttest_power
    (behind TTestPower and TTestIndPower; they agree to 1e-9, tests/ablate/test_stats_library.py).
    A wrapper because statsmodels takes its tails as 1 − special.nctdtr, which is NaN where
    scipy.stats.nct is finite (df = 1, nc = −21.9: NaN vs power 0.269), and a NaN power stops the
    runs-needed search early (2 pairs reported where 3 are needed). The lower tail is taken as
    nct.sf(c, df, −nc) (= nct.cdf(−c, df, nc) by symmetry), which scipy evaluates where its cdf
    gives NaN (df = 1, nc = +21.9: cdf NaN, sf 0.0)."""
    if alternative == "two-sided":
        c = stats.t.isf(alpha / 2, df)
        return float(stats.nct.sf(c, df, nc) + stats.nct.sf(c, df, -nc))
    c = stats.t.isf(alpha, df)
    if alternative == "less":
        nc = -nc
    return float(stats.nct.sf(c, df, nc))


def welch_power(n: int, delta: float, sd_arm: float, sd_base: float, alpha: float,
                alternative: str = "two-sided") -> float:
    """Power of Welch's test with n runs per arm: noncentrality Δ / sqrt((s_a² + s_b²)/n) on the
    Welch df (n−1)(s_a² + s_b²)² / (s_a⁴ + s_b⁴). A wrapper because statsmodels' TTestIndPower
    assumes one common sd (df = 2n − 2); with s_a = s_b it is TTestIndPower().power."""
    va, vb = sd_arm ** 2, sd_base ** 2
    df = (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2)
    return t_power(delta / math.sqrt((va + vb) / n), df, alpha, alternative)


def runs_needed(delta: float, sd_arm: float, sd_base: float, alpha: float, power: float = 0.8,
                alternative: str = "two-sided") -> int | None:
    """Runs per arm (equal n) for Welch's test to detect `delta` with `power` at level `alpha`.

    Smallest n with `welch_power(n, ...)` ≥ power. Close to the normal formula
    n ≈ (z_{1−α/2} + z_{power})² (s_a² + s_b²) / Δ². None when it would exceed MAX_RUNS_NEEDED,
    when Δ is 0/NaN, or when Δ points away from a one-sided alternative. A wrapper because
    statsmodels has no Welch sample size with unequal variances (with s_a = s_b it equals
    ceil(TTestIndPower().solve_power(...)), tested).
    """
    check_alternative(alternative)
    va, vb = sd_arm ** 2, sd_base ** 2
    if _undetectable(delta, va + vb, alternative):     # va + vb is finite iff both are
        return None
    return _smallest_n(lambda n: welch_power(n, delta, sd_arm, sd_base, alpha, alternative), power,
                       _normal_n(delta, va + vb, alpha, power, alternative))


def runs_needed_paired(delta: float, sd_diff: float, alpha: float, power: float = 0.8,
                       alternative: str = "two-sided") -> int | None:
    """Pairs needed for the paired t-test: smallest n with `t_power` ≥ power at noncentrality
    Δ sqrt(n) / s_d on n − 1 df, i.e. TTestPower().power(effect_size=Δ/s_d, nobs=n, alpha) where
    statsmodels is finite; ceil(TTestPower().solve_power(...)) there (tested)."""
    check_alternative(alternative)
    if _undetectable(delta, sd_diff, alternative):
        return None
    return _smallest_n(lambda n: t_power(delta * math.sqrt(n) / sd_diff, n - 1, alpha, alternative), power,
                       _normal_n(delta, sd_diff ** 2, alpha, power, alternative))


# ---------------------------------------------------------------- blocked analysis

def machine(df: pd.DataFrame) -> pd.Series:
    """Where each run ran, as a key that survives a resumed experiment: `hostname` plus the run's
    GPU UUIDs (`gpu_uuids`, "" on CPU), e.g. "gpu-node-3|GPU-1a2b...,GPU-3c4d...". None when the
    host is unknown (imported logs). Not Ray's `node_id`: a resumed experiment starts a new Ray
    session whose nodes get new ids, which would split the blocks of identical data."""
    host = df["hostname"] if "hostname" in df else pd.Series(None, index=df.index, dtype=object)
    gpus = df["gpu_uuids"] if "gpu_uuids" in df else pd.Series("", index=df.index, dtype=object)
    out = [f"{h}|{','.join(sorted(g.split(','))) if isinstance(g, str) else ''}" if isinstance(h, str) and h
           else None for h, g in zip(host, gpus)]
    return pd.Series(out, index=df.index, dtype=object)


def _block_keys(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"node": machine(df), "round": df.get("round"), "seed": df.get("seed"),
                        "order": df.get("order", pd.Series(range(len(df)), index=df.index))},
                       index=df.index)
    return out


def pair_runs(arm_runs: pd.DataFrame, base_runs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Index pairs (arm row, baseline row) for the blocked analysis, or None if it does not apply.

    A pair is one ok run of each arm with the same (machine, round, seed), machine being the
    host and its GPUs (`machine`): the two ran interleaved on the same hardware with the same
    seed. Where a key holds several runs of an arm the earliest launched (`order`) is used.
    The analysis applies when there are at least MIN_PAIRS pairs covering at least
    MIN_PAIR_COVERAGE of the smaller arm's ok runs.
    """
    if arm_runs.empty or base_runs.empty:
        return None
    ka, kb = _block_keys(arm_runs), _block_keys(base_runs)
    cols = ["node", "round", "seed"]
    ka = ka.dropna(subset=cols).sort_values("order", kind="mergesort")
    kb = kb.dropna(subset=cols).sort_values("order", kind="mergesort")
    ka = ka[~ka.duplicated(cols)]
    kb = kb[~kb.duplicated(cols)]
    ka = ka.rename_axis("row").reset_index()
    kb = kb.rename_axis("row").reset_index()
    merged = ka.merge(kb, on=cols, suffixes=("_a", "_b"))
    n_pairs = len(merged)
    if n_pairs < MIN_PAIRS or n_pairs < MIN_PAIR_COVERAGE * min(len(arm_runs), len(base_runs)):
        return None
    merged = merged.sort_values(["round", "seed", "node"], kind="mergesort")
    return merged["row_a"].to_numpy(), merged["row_b"].to_numpy()

"""ablate/analysis/stats.py's library-backed statistics against the libraries and against the hand-written
formulas they replaced (copied below as `Old*`), including the edge cases.

    python -m pytest tests/ablate/test_stats_library.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from ablate.analysis import stats

ALTS = ("two-sided", "less", "greater")
SM_ALT = {"two-sided": "two-sided", "less": "smaller", "greater": "larger"}


# ---------------------------------------------------------------- the formulas before issue 17 (reference)

def _old_arr(x):
    a = np.asarray(x, dtype=float).ravel()
    return a[np.isfinite(a)]


def old_summary_ci(x, confidence=0.95):
    a = _old_arr(x)
    if len(a) < 2:
        return math.nan, math.nan
    mean, se = float(a.mean()), float(a.std(ddof=1)) / math.sqrt(len(a))
    half = float(sps.t.ppf(0.5 + confidence / 2, len(a) - 1)) * se
    return mean - half, mean + half


def _old_ci(delta, se, df, alternative, confidence):
    if alternative == "two-sided":
        h = float(sps.t.ppf(0.5 + confidence / 2, df)) * se
        return delta - h, delta + h
    h = float(sps.t.ppf(confidence, df)) * se
    return (-math.inf, delta + h) if alternative == "less" else (delta - h, math.inf)


def _old_p(t, df, alternative):
    if alternative == "two-sided":
        return float(2 * sps.t.sf(abs(t), df))
    return float(sps.t.cdf(t, df)) if alternative == "less" else float(sps.t.sf(t, df))


def old_welch(arm, base, alternative="two-sided", confidence=0.95):
    """(delta, ci_low, ci_high, p, df, stat) as the old welch computed them."""
    a, b = _old_arr(arm), _old_arr(base)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return (float(a.mean() - b.mean()) if na and nb else math.nan,) + (math.nan,) * 5
    va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
    delta = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return delta, delta, delta, 1.0 if delta == 0 else 0.0, math.nan, math.nan
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    t = delta / se
    return (delta, *_old_ci(delta, se, df, alternative, confidence), _old_p(t, df, alternative), float(df), float(t))


def old_paired(arm, base, alternative="two-sided", confidence=0.95):
    a, b = np.asarray(arm, dtype=float).ravel(), np.asarray(base, dtype=float).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else math.nan,) + (math.nan,) * 5
    delta = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return delta, delta, delta, 1.0 if delta == 0 else 0.0, n - 1, math.nan
    t = delta / se
    return (delta, *_old_ci(delta, se, n - 1, alternative, confidence), _old_p(t, n - 1, alternative),
            float(n - 1), float(t))


def old_adjust(pvalues, method):
    p = np.asarray(pvalues, dtype=float)
    out = p.copy()
    ok = np.isfinite(p)
    m = int(ok.sum())
    if method == "none" or m == 0:
        return out
    q = p[ok]
    order = np.argsort(q, kind="mergesort")
    ranked = q[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:
        adj = np.minimum.accumulate((m / np.arange(m, 0, -1) * ranked[::-1]))[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


def _old_power_t(nc, df, alpha, alternative, nan_tail=False):
    """The pre-library power. Its two-sided lower tail was nct.cdf(−c, df, nc), NaN at df = 1 for
    large positive nc (fixed in stats.t_power: nct.sf(c, df, −nc), the same number where finite);
    `nan_tail=True` gives that old form, the default the fixed one."""
    if alternative == "two-sided":
        c = sps.t.isf(alpha / 2, df)
        lower = sps.nct.cdf(-c, df, nc) if nan_tail else sps.nct.sf(c, df, -nc)
        return float(sps.nct.sf(c, df, nc) + lower)
    c = sps.t.isf(alpha, df)
    return float(sps.nct.sf(c, df, -nc if alternative == "less" else nc))


def _old_smallest_n(power_at, power, n_normal):
    if not math.isfinite(n_normal) or n_normal > 10_000:
        return None
    n = max(2, int(math.floor(n_normal)) - 2)
    while n > 2 and power_at(n - 1) >= power:
        n -= 1
    while power_at(n) < power:
        n += 1
        if n > 10_000:
            return None
    return n


def _old_normal_n(delta, var_sum, alpha, power, alternative):
    z_a = sps.norm.isf(alpha / 2 if alternative == "two-sided" else alpha)
    return (z_a + sps.norm.ppf(power)) ** 2 * var_sum / delta ** 2


def old_runs_needed(delta, sd_arm, sd_base, alpha, power=0.8, alternative="two-sided"):
    va, vb = sd_arm ** 2, sd_base ** 2
    if not all(map(math.isfinite, (delta, va, vb))) or delta == 0 or va + vb == 0:
        return None
    if (alternative == "less" and delta > 0) or (alternative == "greater" and delta < 0):
        return None

    def power_at(n):
        se = math.sqrt((va + vb) / n)
        return _old_power_t(delta / se, (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2), alpha, alternative)
    return _old_smallest_n(power_at, power, _old_normal_n(delta, va + vb, alpha, power, alternative))


def old_runs_needed_paired(delta, sd_diff, alpha, power=0.8, alternative="two-sided"):
    if not (math.isfinite(delta) and math.isfinite(sd_diff)) or delta == 0 or sd_diff == 0:
        return None
    if (alternative == "less" and delta > 0) or (alternative == "greater" and delta < 0):
        return None
    return _old_smallest_n(lambda n: _old_power_t(delta * math.sqrt(n) / sd_diff, n - 1, alpha, alternative),
                           power, _old_normal_n(delta, sd_diff ** 2, alpha, power, alternative))


# ---------------------------------------------------------------- helpers

def same(x, y, rel=1e-12):
    """Equal to `rel` (relative), NaN == NaN, ±inf == ±inf; a 0 must be an exact 0."""
    x, y = float(x), float(y)
    if math.isnan(x) or math.isnan(y) or math.isinf(x) or math.isinf(y) or x == 0 or y == 0:
        return (math.isnan(x) and math.isnan(y)) or x == y
    return abs(x - y) <= rel * max(abs(x), abs(y))


def fields(c: stats.Comparison):
    return c.delta, c.ci_low, c.ci_high, c.p, c.df, c.stat


def samples(seed=0, count=120):
    """Pairs of samples like a speedrun's losses/times: 2-12 values, sds 1e-4..1."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(2, 13))
        scale = 10 ** rng.uniform(-4, 0)
        base = 3.28 + rng.normal(0, scale, n)
        arm = base + rng.normal(rng.normal(0, 2 * scale), scale * rng.uniform(0.3, 2), n)
        yield arm, base


EDGE_CASES = {
    "empty": ([], [3.28, 3.29]),
    "one value each": ([3.27], [3.28]),
    "one value vs three": ([3.27], [3.28, 3.29, 3.30]),
    "identical samples": ([3.27, 3.28, 3.29], [3.27, 3.28, 3.29]),
    "zero variance, same mean": ([3.28, 3.28, 3.28], [3.28, 3.28, 3.28]),
    "zero variance, other mean": ([3.27, 3.27, 3.27], [3.28, 3.28, 3.28]),
    "constant shift (zero-variance differences)": ([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]),
    "NaN and inf dropped": ([3.27, float("nan"), 3.26, 3.25], [3.28, 3.29, float("inf"), 3.30]),
    "all NaN": ([float("nan")] * 3, [3.28, 3.29, 3.30]),
    "two values each": ([3.27, 3.26], [3.28, 3.30]),
}


# ---------------------------------------------------------------- t-tests

@pytest.mark.parametrize("alternative", ALTS)
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_welch_and_paired_give_scipys_numbers(alternative, confidence):
    for arm, base in samples(seed=int(confidence * 100)):
        w = stats.welch(arm, base, alternative, confidence)
        ref = sps.ttest_ind(arm, base, equal_var=False, alternative=alternative)
        ci = ref.confidence_interval(confidence)
        assert all(map(same, (w.stat, w.df, w.p, w.ci_low, w.ci_high),
                       (ref.statistic, ref.df, ref.pvalue, ci.low, ci.high))), (arm, base)
        p = stats.paired(arm, base, alternative, confidence)
        ref = sps.ttest_rel(arm, base, alternative=alternative)
        ci = ref.confidence_interval(confidence)
        assert all(map(same, (p.stat, p.df, p.p, p.ci_low, p.ci_high),
                       (ref.statistic, ref.df, ref.pvalue, ci.low, ci.high))), (arm, base)
        assert p.n_pairs == len(arm)


@pytest.mark.parametrize("alternative", ALTS)
def test_welch_and_paired_give_the_old_numbers_bit_for_bit(alternative):
    for arm, base in samples(seed=1):
        for conf in (0.9, 0.95):
            new = fields(stats.welch(arm, base, alternative, conf))
            assert all(same(x, y, rel=0) for x, y in zip(new, old_welch(arm, base, alternative, conf)))
            new = fields(stats.paired(arm, base, alternative, conf))
            assert all(same(x, y, rel=0) for x, y in zip(new, old_paired(arm, base, alternative, conf)))


@pytest.mark.parametrize("alternative", ALTS)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_keep_the_old_behaviour(case, alternative):
    arm, base = EDGE_CASES[case]
    w = stats.welch(arm, base, alternative)
    assert all(same(x, y, rel=0) for x, y in zip(fields(w), old_welch(arm, base, alternative))), fields(w)
    if len(arm) == len(base):
        p = stats.paired(arm, base, alternative)
        assert all(same(x, y, rel=0) for x, y in zip(fields(p), old_paired(arm, base, alternative))), fields(p)
    for x in (arm, base):
        s = stats.summarize(x)
        assert all(same(x, y, rel=0) for x, y in zip((s.ci_low, s.ci_high), old_summary_ci(x)))


def test_edge_case_values_are_the_documented_ones():
    """What the edge cases give, spelled out (the comparison above would pass if both were wrong)."""
    eq = stats.welch(*EDGE_CASES["zero variance, same mean"])
    assert (eq.delta, eq.ci_low, eq.ci_high, eq.p) == (0.0, 0.0, 0.0, 1.0) and math.isnan(eq.df)
    ne = stats.welch(*EDGE_CASES["zero variance, other mean"])
    assert ne.p == 0.0 and ne.delta == pytest.approx(-0.01) and ne.ci_low == ne.ci_high == ne.delta
    one = stats.welch(*EDGE_CASES["one value each"])
    assert one.delta == pytest.approx(-0.01) and math.isnan(one.p) and math.isnan(one.ci_low)
    assert math.isnan(stats.welch(*EDGE_CASES["empty"]).delta)
    ident = stats.welch(*EDGE_CASES["identical samples"])
    assert (ident.delta, ident.stat, ident.p) == (0.0, 0.0, 1.0)
    shift = stats.paired(*EDGE_CASES["constant shift (zero-variance differences)"])
    assert (shift.delta, shift.ci_low, shift.ci_high, shift.p, shift.df) == (-0.5, -0.5, -0.5, 0.0, 2)
    assert math.isnan(shift.stat)
    dropped = stats.paired(*EDGE_CASES["NaN and inf dropped"])
    assert dropped.n_pairs == 2 and dropped.delta == pytest.approx(-0.03)   # pairs 1 and 4


def test_summarize_is_scipys_sem_and_t_interval():
    for arm, _ in samples(seed=2, count=40):
        s = stats.summarize(arm, 0.9)
        lo, hi = sps.t.interval(0.9, len(arm) - 1, loc=np.mean(arm), scale=sps.sem(arm))
        assert same(s.se, sps.sem(arm)) and same(s.ci_low, lo) and same(s.ci_high, hi)


# ---------------------------------------------------------------- corrections

def pvalue_vectors(seed, count):
    """p-value vectors of 1-11 arms with NaNs and ties, as a table's column would hold."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        p = rng.uniform(0, 0.3, int(rng.integers(1, 12)))
        p[rng.uniform(size=len(p)) < 0.15] = np.nan
        p[rng.uniform(size=len(p)) < 0.1] = p[0]                 # ties
        yield p


@pytest.mark.parametrize("method", ["holm", "bh", "none"])
def test_adjust_pvalues_gives_the_old_numbers_and_keeps_nan_in_place(method):
    for p in pvalue_vectors(4, 300):
        new = stats.adjust_pvalues(p, method)
        assert np.array_equal(np.isnan(new), np.isnan(p))
        if method == "holm":                                       # unchanged formula: bit for bit
            np.testing.assert_array_equal(new, old_adjust(p, method))
        else:                                                      # BH: p/(j/m) vs (m/j)·p, ≤ 1 ulp
            np.testing.assert_allclose(new, old_adjust(p, method), rtol=1e-15, atol=0)
    assert stats.adjust_pvalues([], "holm").size == 0
    assert np.isnan(stats.adjust_pvalues([np.nan, np.nan], "bh")).all()


@pytest.mark.parametrize("method,sm", [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjust_pvalues_is_multipletests_bit_for_bit(method, sm):
    # few vectors: multipletests(method="holm") runs gc.collect() per call (why Holm is written out)
    for p in pvalue_vectors(5, 8 if method == "holm" else 300):
        ok = np.isfinite(p)
        if ok.any():
            np.testing.assert_array_equal(stats.adjust_pvalues(p, method)[ok], multipletests(p[ok], method=sm)[1])


# ---------------------------------------------------------------- power and runs needed

@pytest.mark.parametrize("alternative", ALTS)
def test_t_power_is_statsmodels_power_where_statsmodels_is_finite(alternative):
    rng = np.random.default_rng(6)
    checked = 0
    for _ in range(150):
        n, d, alpha = int(rng.integers(2, 120)), float(rng.normal(0, 1.2)), float(rng.choice([0.05, 0.01, 0.0125]))
        ref = TTestPower().power(effect_size=d, nobs=n, alpha=alpha, alternative=SM_ALT[alternative])
        if not np.isfinite(ref):
            continue
        checked += 1
        assert stats.t_power(d * math.sqrt(n), n - 1, alpha, alternative) == pytest.approx(ref, rel=1e-9, abs=1e-12)
        ind = TTestIndPower().power(effect_size=d, nobs1=n, alpha=alpha, alternative=SM_ALT[alternative])
        if np.isfinite(ind):
            assert stats.welch_power(n, d, 1.0, 1.0, alpha, alternative) == pytest.approx(ind, rel=1e-9, abs=1e-12)
        sa, sb = 0.5, 1.5          # unequal sds: TTestIndPower with the Welch df and the mean variance
        df = (n - 1) * (sa ** 2 + sb ** 2) ** 2 / (sa ** 4 + sb ** 4)
        ind = TTestIndPower().power(effect_size=d / math.sqrt((sa ** 2 + sb ** 2) / 2), nobs1=n, alpha=alpha,
                                    df=df, alternative=SM_ALT[alternative])
        if np.isfinite(ind):
            assert stats.welch_power(n, d, sa, sb, alpha, alternative) == pytest.approx(ind, rel=1e-9, abs=1e-12)
    assert checked > 100


def test_runs_needed_where_statsmodels_power_is_nan():
    """df = 1, nc = −21.9: statsmodels' power is NaN (1 − special.nctdtr), scipy.stats.nct gives
    0.269 (a simulation agrees), so 2 pairs are not enough at power 0.9 and 3 are."""
    d, sd = -1.8505062032964845, 0.11948225131061271
    power2 = stats.t_power(d * math.sqrt(2) / sd, 1, 0.01)
    rng = np.random.default_rng(0)
    t = (rng.normal(size=400_000) + d * math.sqrt(2) / sd) / np.sqrt(rng.chisquare(1, 400_000))
    assert power2 == pytest.approx(np.mean(np.abs(t) > sps.t.isf(0.005, 1)), abs=0.003)
    assert stats.runs_needed_paired(d, sd, 0.01, 0.9) == 3 == old_runs_needed_paired(d, sd, 0.01, 0.9)


def test_a_nan_power_no_longer_stops_the_runs_needed_search():
    """Δ = 1.52, sd of differences 0.28, α 0.05, power 0.9: with 2 pairs (df 1, nc 7.67) the old lower
    tail was NaN, the search stopped there and reported 2; the power is 0.45 at 2 pairs and 0.99 at 3."""
    d, sd = 1.520628134207834, 0.28020370089543456
    assert math.isnan(_old_power_t(d * math.sqrt(2) / sd, 1, 0.05, "two-sided", nan_tail=True))
    assert 0.3 < stats.t_power(d * math.sqrt(2) / sd, 1, 0.05) < 0.9
    assert stats.runs_needed_paired(d, sd, 0.05, 0.9) == 3


def test_runs_needed_gives_the_old_numbers():
    """The old numbers (with the old power's NaN lower tail fixed: see the test above)."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        d = float(rng.choice([-1, 1]) * 10 ** rng.uniform(-2, 0.5))
        sa, sb = float(10 ** rng.uniform(-1, 0.3)), float(10 ** rng.uniform(-1, 0.3))
        alpha, power = float(rng.choice([0.05, 0.01, 0.025])), float(rng.choice([0.5, 0.8, 0.9]))
        for alt in ALTS:
            assert stats.runs_needed(d, sa, sb, alpha, power, alt) == old_runs_needed(d, sa, sb, alpha, power, alt)
            assert stats.runs_needed_paired(d, sa, alpha, power, alt) == old_runs_needed_paired(d, sa, alpha, power,
                                                                                                alt)
    for args in ((0.0, 1.0, 1.0), (math.nan, 1.0, 1.0), (1.0, 0.0, 0.0), (1.0, math.nan, 1.0), (1.0, math.inf, 1.0),
                 (1e-6, 1.0, 1.0), (1.0, 0.0, 1.0)):
        assert stats.runs_needed(*args, 0.05) == old_runs_needed(*args, 0.05)
        assert stats.runs_needed_paired(args[0], args[1], 0.05) == old_runs_needed_paired(args[0], args[1], 0.05)


# ---------------------------------------------------------------- sequential looks (ablate/analysis/sequential.py)

def test_sequential_target_and_welch_z_are_scipys_t_and_the_old_numbers():
    import pandas as pd

    from ablate.analysis.sequential import target_z, welch_z
    from ablate.analysis.group_sequential import z_from_t

    def old_target_z(x, target):
        s = x.std(ddof=1)
        if s == 0:
            return math.copysign(math.inf, target - x.mean()) if x.mean() != target else 0.0
        return float(z_from_t((target - x.mean()) / (s / math.sqrt(len(x))), len(x) - 1))

    def old_welch_z(a, b):
        na, nb = a.shape[1], b.shape[1]
        va, vb = a.var(axis=1, ddof=1) / na, b.var(axis=1, ddof=1) / nb
        t = (a.mean(axis=1) - b.mean(axis=1)) / np.sqrt(va + vb)
        return z_from_t(t, (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)))

    rng = np.random.default_rng(8)
    for arm, base in samples(seed=9, count=60):
        assert same(target_z(pd.Series(arm), 3.28), old_target_z(arm, 3.28), rel=1e-11)
        ref = sps.ttest_1samp(arm, 3.28, alternative="less").pvalue      # z carries the rule's tail
        assert same(sps.norm.sf(target_z(pd.Series(arm), 3.28)), ref, rel=1e-9)
    for x, target in (([3.28, 3.28, 3.28], 3.28), ([3.27, 3.27], 3.28), ([3.29, 3.29], 3.28),
                      ([3.27, float("nan"), 3.26], 3.28)):
        assert same(target_z(pd.Series(x), target), old_target_z(np.array(x), target), rel=0)
    a, b = rng.normal(0.3, 1.0, (500, 7)), rng.normal(0.0, 2.0, (500, 9))
    np.testing.assert_allclose(welch_z(a, b), old_welch_z(a, b), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("nc", [21.9, -21.9, 50.0, -50.0])
def test_two_sided_power_is_finite_for_large_effects_either_way(nc):
    """scipy's nct.cdf is NaN at df = 1 for large positive noncentrality; the two-sided power takes
    the lower tail as nct.sf(c, df, −nc), so a large "arm is worse" effect has the same power as an
    equally large "better" one (and runs_needed does not stop early on a NaN)."""
    from ablate.analysis.stats import t_power

    p = t_power(nc, 1, 0.05)
    assert math.isfinite(p) and p == pytest.approx(t_power(-nc, 1, 0.05), rel=1e-12)
    assert p > 0.9


def test_ci_half_width_is_the_summary_interval_and_works_per_element():
    import math

    import numpy as np

    from ablate.analysis import stats

    x = [3.281, 3.279, 3.284, 3.280]
    s = stats.summarize(x)
    half = stats.ci_half_width(s.std, s.n)
    assert s.ci_high - s.mean == pytest.approx(half, rel=1e-12) and s.mean - s.ci_low == pytest.approx(half, rel=1e-12)
    assert math.isnan(stats.ci_half_width(0.1, 1))
    arr = stats.ci_half_width(np.array([s.std, 0.2, 0.3]), np.array([4, 1, 0]))
    assert arr[0] == half and np.isnan(arr[1:]).all()

"""Every statistic of ablate/analysis/stats.py against scipy/statsmodels on fixed data.

    python -m pytest tests/ablate/test_stats.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import special
from scipy import stats as sps
from statsmodels.stats.meta_analysis import effectsize_smd
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from ablate.analysis import stats

# final val losses and train times (s) of two arms, as a speedrun log would give them
BASE_LOSS = [3.2791, 3.2775, 3.2803, 3.2786, 3.2797, 3.2779, 3.2788]
ARM_LOSS = [3.2770, 3.2761, 3.2783, 3.2769, 3.2758, 3.2774]
BASE_TIME = [131.21, 131.28, 131.19, 131.25, 131.17, 131.30, 131.22]
ARM_TIME = [131.02, 131.11, 130.95, 131.08, 131.01, 131.07]


def test_summarize_matches_scipy():
    x = np.array(BASE_LOSS)
    s = stats.summarize(x, 0.95)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert s.n == 7
    assert s.mean == pytest.approx(x.mean(), abs=1e-15)
    assert s.std == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert s.se == pytest.approx(sps.sem(x), rel=1e-12)
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))


def test_summarize_small_samples_and_nan():
    assert stats.summarize([]).n == 0 and math.isnan(stats.summarize([]).mean)
    one = stats.summarize([3.28])
    assert one.n == 1 and one.mean == 3.28 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert stats.summarize([3.28, float("nan"), 3.29]).n == 2     # NaN dropped


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_welch_matches_scipy(alternative):
    for a, b in ((ARM_LOSS, BASE_LOSS), (ARM_TIME, BASE_TIME)):
        c = stats.welch(a, b, alternative, 0.95)
        ref = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
        ci = ref.confidence_interval(0.95)
        assert c.method == "welch"
        assert c.delta == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
        assert c.stat == pytest.approx(ref.statistic, rel=1e-10)
        assert c.df == pytest.approx(ref.df, rel=1e-10)
        assert c.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert c.ci_low == pytest.approx(ci.low, rel=1e-9) if math.isfinite(ci.low) else c.ci_low == -math.inf
        assert c.ci_high == pytest.approx(ci.high, rel=1e-9) if math.isfinite(ci.high) else c.ci_high == math.inf


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_paired_matches_scipy(alternative):
    a, b = ARM_TIME, BASE_TIME[:6]
    c = stats.paired(a, b, alternative, 0.95)
    ref = sps.ttest_rel(a, b, alternative=alternative)
    ci = ref.confidence_interval(0.95)
    assert c.method == "paired" and c.n_pairs == 6 and c.df == 5
    assert c.stat == pytest.approx(ref.statistic, rel=1e-10)
    assert c.p == pytest.approx(ref.pvalue, rel=1e-9)
    if math.isfinite(ci.low):
        assert c.ci_low == pytest.approx(ci.low, rel=1e-9)
    if math.isfinite(ci.high):
        assert c.ci_high == pytest.approx(ci.high, rel=1e-9)


def test_paired_rejects_misaligned():
    with pytest.raises(ValueError, match="pairs must align"):
        stats.paired([1.0, 2.0], [1.0])


def test_hedges_g_against_statsmodels_and_exact_j():
    a, b = np.array(ARM_LOSS), np.array(BASE_LOSS)
    g = stats.hedges_g(a, b)
    smd, _ = effectsize_smd(a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b))
    df = len(a) + len(b) - 2
    j_approx = 1 - 3 / (4 * (len(a) + len(b)) - 9)     # statsmodels' approximation of J
    j_exact = special.gamma(df / 2) / (math.sqrt(df / 2) * special.gamma((df - 1) / 2))
    assert g / j_exact == pytest.approx(smd / j_approx, rel=1e-12)   # same Cohen's d
    assert g == pytest.approx(smd, rel=2e-3)                          # J exact vs approximate
    assert g < 0                                                      # the arm's loss is lower


def test_target_pvalue_is_the_speedrun_rule():
    ref = sps.ttest_1samp(ARM_LOSS, 3.28, alternative="less").pvalue
    assert stats.target_pvalue(ARM_LOSS, 3.28) == ref
    assert stats.target_pvalue(ARM_LOSS, 3.28) < 0.01 < stats.target_pvalue(BASE_LOSS, 3.279)
    assert math.isnan(stats.target_pvalue([3.27], 3.28))


@pytest.mark.parametrize("method,sm", [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjust_pvalues_matches_statsmodels(method, sm):
    p = np.array([0.001, 0.04, 0.03, 0.2, 0.011, 0.04])
    ref = multipletests(p, method=sm)[1]
    np.testing.assert_allclose(stats.adjust_pvalues(p, method), ref, rtol=1e-12)


def test_adjust_pvalues_keeps_nan_and_none():
    p = np.array([0.01, np.nan, 0.02])
    out = stats.adjust_pvalues(p, "holm")
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], multipletests([0.01, 0.02], method="holm")[1])
    np.testing.assert_array_equal(stats.adjust_pvalues([0.3, 0.01], "none"), [0.3, 0.01])
    with pytest.raises(ValueError, match="correction='bonf'"):
        stats.adjust_pvalues([0.1], "bonf")


@pytest.mark.parametrize("alternative,sm", [("two-sided", "two-sided"), ("greater", "larger")])
@pytest.mark.parametrize("effect", [0.4, 1.0, 1.28, 2.5])
def test_runs_needed_matches_statsmodels(effect, alternative, sm):
    n = stats.runs_needed(effect * 0.0015, 0.0015, 0.0015, 0.01, 0.8, alternative)
    ref = TTestIndPower().solve_power(effect_size=effect, alpha=0.01, power=0.8, alternative=sm)
    assert n == max(2, math.ceil(ref))
    n_p = stats.runs_needed_paired(effect * 0.06, 0.06, 0.05, 0.8, alternative)
    ref_p = TTestPower().solve_power(effect_size=effect, alpha=0.05, power=0.8, alternative=sm)
    assert n_p == max(2, math.ceil(ref_p))


def test_runs_needed_edge_cases():
    assert stats.runs_needed(0.0, 1.0, 1.0, 0.05) is None
    assert stats.runs_needed(float("nan"), 1.0, 1.0, 0.05) is None
    assert stats.runs_needed(0.5, 1.0, 1.0, 0.05, alternative="less") is None      # wrong direction
    assert stats.runs_needed(-0.5, 1.0, 1.0, 0.05, alternative="less") == stats.runs_needed(0.5, 1, 1, 0.05,
                                                                                            alternative="greater")
    assert stats.runs_needed(1e-6, 1.0, 1.0, 0.05) is None                          # beyond MAX_RUNS_NEEDED
    # unequal variances: more runs than with the smaller sd on both sides
    assert stats.runs_needed(1.0, 1.0, 2.0, 0.05) > stats.runs_needed(1.0, 1.0, 1.0, 0.05)


def _runs(arm, rounds, seeds, hosts, orders=None, gpus=None, node_ids=None):
    n = len(rounds)
    return pd.DataFrame({"arm": arm, "round": rounds, "seed": seeds, "hostname": hosts,
                         "gpu_uuids": gpus if gpus is not None else [""] * n,
                         "node_id": node_ids if node_ids is not None else [None] * n,
                         "order": orders if orders is not None else list(range(n))})


def test_pair_runs_pairs_by_machine_round_seed():
    a = _runs("x", [0, 1, 2, 3], [0, 1, 2, 3], ["n1", "n2", "n1", "n2"])
    b = _runs("base", [3, 2, 1, 0], [3, 2, 1, 0], ["n2", "n1", "n2", "n1"]).set_index(pd.Index([10, 11, 12, 13]))
    ia, ib = stats.pair_runs(a, b)
    assert list(ia) == [0, 1, 2, 3] and list(ib) == [13, 12, 11, 10]


def test_pair_runs_requires_same_machine_and_enough_pairs():
    a = _runs("x", [0, 1, 2, 3], [0, 1, 2, 3], ["n1", "n1", "n1", "n1"])
    b = _runs("base", [0, 1, 2, 3], [0, 1, 2, 3], ["n1", "n2", "n2", "n2"])
    assert stats.pair_runs(a, b) is None                      # only one pair shares a host
    no_hosts = _runs("base", [0, 1, 2, 3], [0, 1, 2, 3], [None] * 4)
    assert stats.pair_runs(a, no_hosts) is None               # imports: no host, no blocks
    few = _runs("base", [0, 1, 2, 3], [0, 1, 2, 3], ["n1", "n1", "n9", "n9"])
    assert stats.pair_runs(a, few) is None                    # 2 pairs < MIN_PAIRS
    other_gpus = _runs("base", [0, 1, 2, 3], [0, 1, 2, 3], ["n1"] * 4, gpus=["GPU-7"] * 4)
    assert stats.pair_runs(a, other_gpus) is None             # same host, other GPUs: other hardware


def test_pair_runs_uses_first_launch_and_gpu_order_does_not_matter():
    a = pd.DataFrame({"arm": "x", "round": [0, 1, 2, 2], "seed": [0, 1, 2, 2], "hostname": ["h"] * 4,
                      "gpu_uuids": ["GPU-a,GPU-b"] * 4, "order": [0, 2, 5, 4]})
    b = pd.DataFrame({"arm": "b", "round": [0, 1, 2], "seed": [0, 1, 2], "hostname": ["h"] * 3,
                      "gpu_uuids": ["GPU-b,GPU-a"] * 3, "order": [1, 3, 6]})
    ia, ib = stats.pair_runs(a, b)
    assert list(ia) == [0, 1, 3]       # of the two runs with key (h, 2, 2) the earlier launch (order 4)
    assert list(ib) == [0, 1, 2]


def test_pairs_survive_a_resume_that_renews_ray_node_ids():
    """A resumed experiment's new embedded Ray gives the same host new node ids: the blocks (and
    so the paired p-value) must not change with identical data."""
    rng = np.random.default_rng(3)
    base_t = 131.2 + rng.normal(0, 0.05, 4) + np.array([0.0, 0.8, 0.0, 0.8])   # host h2 is 0.8 s slower
    arm_t = base_t - 0.05 + rng.normal(0, 0.01, 4)
    hosts = ["h1", "h2", "h1", "h2"]

    def frame(arm, times, node_ids):
        return _runs(arm, [0] * 4, [0, 1, 2, 3], hosts, gpus=["GPU-x"] * 4, node_ids=node_ids).assign(t=times)

    # one session; or the driver was killed after the baseline's seed 3 and the arm's seed 3 ran in
    # the resumed session, whose Ray gave host h2 the new node id n-d
    before = frame("x", arm_t, ["n-a", "n-b", "n-a", "n-b"]), frame("b", base_t, ["n-a", "n-b", "n-a", "n-b"])
    after = frame("x", arm_t, ["n-a", "n-b", "n-a", "n-d"]), frame("b", base_t, ["n-a", "n-b", "n-a", "n-b"])
    pvals = []
    for a, b in (before, after):
        pairs = stats.pair_runs(a, b)
        assert pairs is not None and len(pairs[0]) == 4
        pvals.append(stats.paired(a.loc[pairs[0], "t"], b.loc[pairs[1], "t"]).p)
    assert pvals[0] == pvals[1]
    assert pvals[0] < 0.01


def test_bad_alternative_names_the_choices():
    with pytest.raises(ValueError, match="two-sided, less, greater"):
        stats.welch([1, 2], [1, 2], "lower")

"""Sequential seeds: group-sequential math, the arms_to_continue rule, and its error rate by simulation.

    python -m pytest tests/ablate/test_sequential.py -q        # ~10 s; the full benchmark is
    python benchmarks/bench_sequential.py                      # (10,000 experiments per scenario)
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ablate.analysis import group_sequential as stats_seq
from ablate.analysis.sequential import SeqPlan, arms_to_continue, arms_to_continue_plan, simulate, simulate_draws
from ablate.spec.model import parse_spec

EQUAL5 = [0.2, 0.4, 0.6, 0.8, 1.0]


# ---------------------------------------------------------------- boundaries

def test_crossing_probability_reproduces_pocock_and_obrien_fleming():
    # classical constants for 5 equally spaced looks, two-sided alpha 0.05
    assert stats_seq.crossing_probability(EQUAL5, [2.413] * 5) == pytest.approx(0.05, abs=2e-4)
    obf = [2.040 * math.sqrt(5 / k) for k in range(1, 6)]
    assert stats_seq.crossing_probability(EQUAL5, obf) == pytest.approx(0.05, abs=2e-4)


def test_hsd_efficacy_bounds_match_published_values():
    # Hwang–Shih–DeCani gamma -4, one-sided 0.025, 5 equal looks (as tabulated by gsDesign)
    b = stats_seq.efficacy_bounds(EQUAL5, 0.025, "greater", gamma=-4)
    assert list(b) == pytest.approx([3.2527, 2.9860, 2.6917, 2.3737, 2.0253], abs=2e-3)


@pytest.mark.parametrize("alternative", ["two-sided", "greater"])
def test_design_spends_exactly_alpha_on_irregular_looks(alternative):
    fr = [3 / 16, 5 / 16, 6 / 16, 9 / 16, 1.0]
    d = stats_seq.design(fr, 0.01, alternative)
    assert stats_seq.crossing_probability(fr, d.efficacy, 0.0, alternative) == pytest.approx(0.01, rel=1e-4)
    assert all(f <= e + 1e-12 for f, e in zip(d.futility, d.efficacy))
    assert d.futility[-1] == d.efficacy[-1]                 # the last look decides everything
    # a partial schedule (experiment still running) has the same early bounds
    part = stats_seq.design(fr[:3], 0.01, alternative)
    assert part.efficacy == pytest.approx(d.efficacy[:3]) and part.futility == pytest.approx(d.futility[:3])


def test_sequential_pvalue_agrees_with_bounds():
    fr = [0.25, 0.5, 0.75, 1.0]
    eff = stats_seq.efficacy_bounds(fr, 0.05)
    spent = stats_seq.hsd_spending(fr, 0.05, stats_seq.GAMMA_EFFICACY)
    spent[-1] = 0.05
    for k in range(4):   # stopping exactly on the bound gives the alpha spent so far
        if math.isfinite(eff[k]):
            assert stats_seq.sequential_pvalue(eff[k], k, fr, 0.05) == pytest.approx(spent[k], rel=1e-4)
    # first look: the ordinary two-sided normal p-value
    assert stats_seq.sequential_pvalue(1.7, 0, fr, 0.05) == pytest.approx(2 * sps.norm.sf(1.7), rel=1e-9)
    assert stats_seq.sequential_pvalue(-1.7, 0, fr, 0.05) == pytest.approx(2 * sps.norm.sf(1.7), rel=1e-9)


def test_z_from_t_keeps_tail_probability():
    z = stats_seq.z_from_t(np.array([-3.0, 0.0, 2.5]), np.array([4, 4, 9]))
    assert z[1] == 0.0
    assert sps.norm.sf(z[2]) == pytest.approx(sps.t.sf(2.5, 9), rel=1e-10)
    assert sps.norm.cdf(z[0]) == pytest.approx(sps.t.cdf(-3.0, 4), rel=1e-10)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="strictly increasing"):
        stats_seq.design([0.5, 0.4], 0.05)
    with pytest.raises(ValueError, match="alternative='up'"):
        stats_seq.design([0.5, 1.0], 0.05, "up")
    with pytest.raises(ValueError, match="need 1 ≤ min ≤ max"):
        SeqPlan(5, 3, 0.01, "baseline", None, "two-sided")


# ---------------------------------------------------------------- error rate by simulation (CI size)

def test_type_one_error_and_power_by_simulation():
    plan = SeqPlan(3, 16, 0.01, "baseline", None, "two-sided")
    rng = np.random.default_rng(20261122)
    n = 6000
    null = simulate(n, plan, {"loss": 0.0, "time": 0.0}, {"loss": 0.0015, "time": 0.06}, rng)
    se = math.sqrt(plan.alpha * (1 - plan.alpha) / n)
    for c in ("loss", "time"):
        assert null.rejected[c].mean() <= plan.alpha + 3 * se
    assert null.runs_per_arm.mean() < 0.75 * plan.max           # futility stops null arms early
    big = simulate(2000, plan, {"loss": -0.004, "time": -0.2}, {"loss": 0.0015, "time": 0.06}, rng)
    assert big.rejected["loss"].mean() > 0.99 and big.rejected["time"].mean() > 0.99
    assert big.runs_per_arm.mean() < 0.5 * plan.max


def test_naive_peeking_would_fail_the_same_check():
    """The check above can fail: testing at alpha after every round inflates the type-I error."""
    rng = np.random.default_rng(7)
    n, alpha = 6000, 0.01
    a, b = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    hit = np.zeros(n, bool)
    for k in range(3, 17):
        p = sps.ttest_ind(a[:, :k], b[:, :k], axis=1, equal_var=False).pvalue
        hit |= p < alpha
    assert hit.mean() > 3 * alpha


# ---------------------------------------------------------------- arms_to_continue

def _spec(**extra):
    data = {"name": "seq", "trainer": {"preset": "tiny"}, "arms": {"baseline": {}, "b": {}, "c": {}},
            "seeds": {"min": 3, "max": 8, "alpha": 0.05}}
    return parse_spec({**data, **extra})


def _row(arm, seed, rnd, order, loss, time_s, status="ok"):
    return dict(arm=arm, seed=seed, round=rnd, order=order, status=status, run_id=f"{arm}-s{seed}-x-a0",
                final_val_loss=loss if status == "ok" else None,
                train_time_ms=time_s * 1000 if status == "ok" else None, node_id=None, hostname=None)


def _first_round(effects, rng, n=3):
    rows = []
    for s in range(n):
        for arm, (dl, dt) in effects.items():
            rows.append(_row(arm, s, 0, len(rows), 3.28 + dl + rng.normal(0, 0.0015),
                             131.0 + dt + rng.normal(0, 0.06)))
    return rows


def test_arms_to_continue_decides_clear_cases():
    rng = np.random.default_rng(3)
    rows = _first_round({"baseline": (0, 0), "b": (-0.02, -2.0), "c": (0, 0)}, rng)
    keep = arms_to_continue(pd.DataFrame(rows), _spec())
    assert "b" not in keep                   # huge effects: decided at the first look
    assert keep == ["baseline", "c"]         # c undecided; the baseline runs while any arm does


def test_arms_below_min_continue_and_at_max_stop():
    rng = np.random.default_rng(4)
    rows = _first_round({"baseline": (0, 0), "b": (0, 0)}, rng)
    rows[-1] = {**rows[-1], "status": "failed", "final_val_loss": None, "train_time_ms": None}
    assert arms_to_continue(pd.DataFrame(rows), _spec(arms={"baseline": {}, "b": {}})) == ["baseline", "b"]
    rows = _first_round({"baseline": (0, 0), "b": (0.0005, 0.01)}, rng, n=8)
    assert arms_to_continue(pd.DataFrame(rows), _spec(arms={"baseline": {}, "b": {}})) == []


def test_target_keeps_the_baseline_running_alone():
    rng = np.random.default_rng(5)
    rows = _first_round({"baseline": (-0.001, 0)}, rng)
    spec = _spec(arms={"baseline": {}}, target_loss=3.28)
    assert arms_to_continue(pd.DataFrame(rows), spec) == ["baseline"]
    assert arms_to_continue(pd.DataFrame(rows), _spec(arms={"baseline": {}})) == []   # nothing to decide


def test_non_sequential_spec_is_refused():
    with pytest.raises(ValueError, match=r"seeds: \{min: 3"):
        arms_to_continue(pd.DataFrame(), parse_spec({"name": "x", "trainer": {"preset": "tiny"},
                                                     "arms": {"baseline": {}}, "seeds": 4}))


def test_arms_to_continue_matches_the_vectorised_simulation():
    """Round by round through the DataFrame rule gives the same runs per arm as simulate_draws."""
    plan = SeqPlan(3, 8, 0.05, "baseline", None, "two-sided")
    rng = np.random.default_rng(11)
    k = 5
    base = {"loss": rng.normal(0, 0.0015, (k, 8)), "time": rng.normal(0, 0.06, (k, 8))}
    arm = {"loss": rng.normal(0.0015, 0.0015, (k, 8)), "time": rng.normal(0, 0.06, (k, 8))}
    expected = simulate_draws(base, arm, plan).runs_per_arm
    for e in range(k):
        def row(name, seed, rnd, order):
            src = base if name == "baseline" else arm
            return _row(name, seed, rnd, order, 3.28 + src["loss"][e, seed], 131.0 + src["time"][e, seed])
        rows = [row(a, s, 0, 2 * s + i) for s in range(3) for i, a in enumerate(("baseline", "b"))]
        seed, rnd = 3, 0
        while "b" in (keep := arms_to_continue_plan(pd.DataFrame(rows), plan)):
            rnd += 1
            rows += [row(a, seed, rnd, len(rows) + i) for i, a in enumerate(keep)]
            seed += 1
        assert seed == expected[e], f"experiment {e}"


def test_orchestrator_decides_on_the_current_config_only(tmp_path):
    """An arm whose override changed starts over: its old config's runs (3 = `max`, which would
    stop it) do not count; its current config has 1 ok run (< `min`), so it continues."""
    from ablate.run.driver import arms_to_continue_stored
    from ablate.spec.model import parse_spec_text
    from ablate.store.parquet import Store
    from tests.ablate.searchstore import row

    spec = parse_spec_text("name: sq\ntrainer: {preset: tiny}\narms: {baseline: {}, lr: {optim.muon.lr: 0.05}}\n"
                           "seeds: {min: 2, max: 3, alpha: 0.05}\nresources: {gpus_per_run: 0}\n")
    store = Store(str(tmp_path / "res"))
    old = spec.config_hash("lr", {**spec.overrides("lr"), "optim.muon.lr": 0.04})
    order = 0
    for arm, h in (("baseline", spec.config_hash("baseline")), ("lr", old)):
        for seed in range(3):
            store.write_run(row(experiment="sq", arm=arm, seed=seed, run_id=f"{arm}-s{seed}-{h}-a1", order=order,
                                round=max(0, seed - 1), config_hash=h, final_val_loss=3.5 + 0.01 * seed), [], [])
            order += 1
    h = spec.config_hash("lr")
    for seed, status in ((0, "ok"), (1, "failed")):   # round 0 of the edited arm
        store.write_run(row(experiment="sq", arm="lr", seed=seed, run_id=f"lr-s{seed}-{h}-a1", order=order,
                            config_hash=h, status=status, error=None if status == "ok" else "boom",
                            final_val_loss=3.5 if status == "ok" else None), [], [])
        order += 1
    assert arms_to_continue_stored(store, spec) == ["baseline", "lr"]

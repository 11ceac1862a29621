"""Group-sequential boundaries, decisions and p-values (Lan–DeMets alpha spending).

    python -c "from ablate.analysis.group_sequential import design; print(design([0.25, 0.5, 0.75, 1.0], 0.01))"

The math behind `ablate/analysis/sequential.py` (which applies it to runs) and the sequential p-values of
`ablate/analysis/tables.py`. Pure functions of information fractions and z statistics; no pandas here.

Model: at look k the oriented statistic is Z_k = S_k / sqrt(t_k), where S is a Brownian motion
with drift theta (theta = expected Z at full information) and t_k in (0, 1] is the information
fraction. Crossing probabilities are computed by the Armitage–McPherson–Rowe recursion: the
density of S_k on the continuation region is propagated look by look on a Simpson grid.

Efficacy bounds spend alpha by the Hwang–Shih–DeCani family and are computed under H0 ignoring
futility (non-binding futility: stopping early for futility can only lower the type-I error).
Futility bounds spend beta = 1 - power under the design drift theta, the drift at which a fixed
design of `max` runs has the requested power. docs/statistics.md explains the choice.

Written here because neither scipy nor statsmodels has a group-sequential design (alpha/beta
spending boundaries, crossing probabilities, stage-wise p-values); the normal and t
distributions, root finding and the t → z map are scipy's (`stats.norm`, `stats.t`, `optimize.brentq`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALTERNATIVES = ("two-sided", "less", "greater")

# Spending-function shapes (Hwang–Shih–DeCani gamma), chosen by benchmarks/bench_sequential.py:
# efficacy close to O'Brien–Fleming (spends little alpha at the first, tiny looks), futility a
# little more eager so that arms with no effect stop early.
GAMMA_EFFICACY = -4.0
GAMMA_FUTILITY = -2.0
DESIGN_POWER = 0.8

_ZMAX = 9.0        # |z| beyond this carries < 1e-18 probability: the grid stops there
_GRID = 241        # Simpson points per continuation interval (odd)


def hsd_spending(t: float | np.ndarray, total: float, gamma: float) -> np.ndarray:
    """Hwang–Shih–DeCani spending: total * (1 - exp(-gamma t)) / (1 - exp(-gamma)); gamma 0 = linear."""
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    if abs(gamma) < 1e-12:
        return total * t
    return total * (1.0 - np.exp(-gamma * t)) / (1.0 - math.exp(-gamma))


def design_drift(alpha: float, alternative: str = "two-sided", power: float = DESIGN_POWER) -> float:
    """Drift theta at which a fixed design at full information has `power` at level `alpha`."""
    _check_alternative(alternative)
    sides = 2 if alternative == "two-sided" else 1
    return float(stats.norm.isf(alpha / sides) + stats.norm.ppf(power))


def z_from_t(t: float | np.ndarray, df: float | np.ndarray) -> np.ndarray:
    """Map a t statistic to the normal quantile with the same tail probability (exact marginally)."""
    t = np.asarray(t, dtype=float)
    df = np.asarray(df, dtype=float)
    upper = stats.norm.isf(stats.t.sf(np.abs(t), df))
    return np.where(t >= 0, upper, -upper)


def orient(z: float | np.ndarray, alternative: str) -> np.ndarray:
    """Orient a (arm − baseline) statistic so that positive means 'towards the alternative'."""
    _check_alternative(alternative)
    z = np.asarray(z, dtype=float)
    return -z if alternative == "less" else z


# ---------------------------------------------------------------- recursion on a grid

def _simpson(lo: float, hi: float, n: int = _GRID) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(lo, hi, n)
    h = (hi - lo) / (n - 1)
    w = np.ones(n)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    return x, w * h / 3.0


class _Density:
    """Sub-density of S_k on the continuation region of look k (grid points and weights)."""

    def __init__(self, s: np.ndarray, wf: np.ndarray, t: float) -> None:
        self.s, self.wf, self.t = s, wf, t      # wf = quadrature weight * density value

    @staticmethod
    def start() -> "_Density":
        return _Density(np.zeros(1), np.ones(1), 0.0)   # S_0 = 0 with probability 1

    def prob_above(self, z: float, t: float, theta: float) -> float:
        """P(continued so far and Z_t >= z)."""
        dt = t - self.t
        c = z * math.sqrt(t)
        return float(np.sum(self.wf * stats.norm.sf((c - self.s - theta * dt) / math.sqrt(dt))))

    def prob_between(self, z_lo: float, z_hi: float, t: float, theta: float) -> float:
        """P(continued so far and z_lo <= Z_t < z_hi)."""
        if z_hi <= z_lo:
            return 0.0
        return self.prob_above(z_lo, t, theta) - self.prob_above(z_hi, t, theta)

    def advance(self, intervals: list[tuple[float, float]], t: float, theta: float) -> "_Density":
        """Density at information t restricted to the union of z intervals (the continuation region)."""
        dt = t - self.t
        sd = math.sqrt(dt)
        pts, wts = [], []
        for z_lo, z_hi in intervals:
            lo, hi = max(z_lo, -_ZMAX) * math.sqrt(t), min(z_hi, _ZMAX) * math.sqrt(t)
            if hi <= lo:
                continue
            x, w = _simpson(lo, hi)
            pts.append(x)
            wts.append(w)
        if not pts:
            return _Density(np.zeros(0), np.zeros(0), t)
        x = np.concatenate(pts)
        w = np.concatenate(wts)
        kern = stats.norm.pdf((x[:, None] - self.s[None, :] - theta * dt) / sd) / sd
        return _Density(x, w * (kern @ self.wf), t)


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r} is not one of {ALTERNATIVES}")


def _check_fractions(fractions) -> np.ndarray:
    t = np.asarray(fractions, dtype=float)
    if t.ndim != 1 or len(t) == 0:
        raise ValueError("fractions must be a non-empty 1-D sequence of information fractions")
    if np.any(t <= 0) or np.any(t > 1 + 1e-12) or np.any(np.diff(t) <= 0):
        raise ValueError(f"fractions={t.tolist()} must be strictly increasing in (0, 1]")
    return np.minimum(t, 1.0)


def _continue_region(a: float, b: float, two_sided: bool) -> list[tuple[float, float]]:
    """z intervals where the trial continues: futility below b (|z| < b if two-sided), efficacy at a."""
    if two_sided:
        if b <= 0:
            return [(-a, a)]
        return [(-a, -b), (b, a)]
    return [(b, a)]


# ---------------------------------------------------------------- design

@dataclass(frozen=True)
class Design:
    """Boundaries on the oriented z scale for looks at `fractions`.

    Efficacy at look k: z >= efficacy[k] (|z| for two-sided). Futility: z < futility[k]
    (|z| < futility[k] for two-sided). At a look with fraction 1 the two coincide.
    """

    fractions: tuple[float, ...]
    efficacy: tuple[float, ...]
    futility: tuple[float, ...]
    alpha: float
    alternative: str
    theta: float


def efficacy_bounds(fractions, alpha: float, alternative: str = "two-sided",
                    gamma: float = GAMMA_EFFICACY) -> np.ndarray:
    """Efficacy bounds spending `alpha` by HSD(gamma) under H0 (futility ignored: non-binding)."""
    _check_alternative(alternative)
    t = _check_fractions(fractions)
    two = alternative == "two-sided"
    spent = hsd_spending(t, alpha, gamma)
    if t[-1] >= 1.0:
        spent[-1] = alpha
    dens = _Density.start()
    bounds = np.empty(len(t))
    prev = 0.0
    for k, tk in enumerate(t):
        target = max(spent[k] - prev, 0.0)
        prev = spent[k]
        if two:
            target /= 2.0       # symmetric: half in each tail
        if target < 1e-15:
            a = math.inf
        else:
            f = lambda z: dens.prob_above(z, tk, 0.0) - target  # noqa: E731
            if f(0.0) <= 0:
                a = 0.0
            else:
                a = optimize.brentq(f, 0.0, _ZMAX + 1.0, xtol=1e-9)
        bounds[k] = a
        a_grid = min(a, _ZMAX)
        dens = dens.advance(_continue_region(a_grid, 0.0, two) if two else [(-_ZMAX, a_grid)], tk, 0.0)
    return bounds


def futility_bounds(fractions, efficacy: np.ndarray, theta: float, beta: float,
                    alternative: str = "two-sided", gamma: float = GAMMA_FUTILITY) -> np.ndarray:
    """Futility bounds spending `beta` by HSD(gamma) under drift theta (both bounds in force)."""
    _check_alternative(alternative)
    t = _check_fractions(fractions)
    two = alternative == "two-sided"
    spent = hsd_spending(t, beta, gamma)
    dens = _Density.start()
    bounds = np.empty(len(t))
    prev = 0.0
    for k, tk in enumerate(t):
        a = float(efficacy[k])
        a_grid = min(a, _ZMAX)
        if tk >= 1.0:
            bounds[k] = a       # last look: every trial is decided
            break
        target = max(spent[k] - prev, 0.0)
        prev = spent[k]
        lo = 0.0 if two else -_ZMAX

        def fut_prob(b: float) -> float:
            if two:
                return dens.prob_between(-b, b, tk, theta)
            return dens.prob_between(-math.inf, b, tk, theta)

        if target < 1e-15:
            b = lo
        elif fut_prob(a_grid) <= target:
            b = a_grid
        else:
            b = optimize.brentq(lambda x: fut_prob(x) - target, lo, a_grid, xtol=1e-9)
        b = min(b, a)
        bounds[k] = b
        if b >= a:
            continue            # every path stops here; later looks are never reached
        dens = dens.advance(_continue_region(a_grid, b, two) if two else [(b, a_grid)], tk, theta)
    return bounds


def design(fractions, alpha: float, alternative: str = "two-sided", power: float = DESIGN_POWER,
           gamma_efficacy: float = GAMMA_EFFICACY, gamma_futility: float = GAMMA_FUTILITY) -> Design:
    """Efficacy and non-binding futility bounds for looks at `fractions` (the last may be < 1)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    t = _check_fractions(fractions)
    theta = design_drift(alpha, alternative, power)
    eff = efficacy_bounds(t, alpha, alternative, gamma_efficacy)
    fut = futility_bounds(t, eff, theta, 1.0 - power, alternative, gamma_futility)
    return Design(tuple(float(x) for x in t), tuple(float(x) for x in eff),
                  tuple(float(x) for x in fut), alpha, alternative, theta)


def decide(z: float | np.ndarray, look: int, d: Design) -> np.ndarray:
    """Decision at look index `look` for oriented z: 'efficacy', 'futility' or 'continue'."""
    z = np.asarray(z, dtype=float)
    a, b = d.efficacy[look], d.futility[look]
    stat = np.abs(z) if d.alternative == "two-sided" else z
    final = d.fractions[look] >= 1.0
    return np.where(stat >= a, "efficacy", np.where((stat < b) | final, "futility", "continue"))


def sequential_pvalue(z: float, look: int, fractions, alpha: float,
                      alternative: str = "two-sided", gamma: float = GAMMA_EFFICACY) -> float:
    """Stage-wise ordering p-value of stopping at `look` with oriented statistic z.

    p = P0(crossing the efficacy bound before `look`) + P0(continuing to `look` and Z >= z)
    (doubled for two-sided, using |z|). Futility is ignored (non-binding), which makes p
    conservative when an arm did stop for futility.
    """
    t = _check_fractions(fractions)[: look + 1]
    eff = efficacy_bounds(t, alpha, alternative, gamma)
    two = alternative == "two-sided"
    stat = abs(z) if two else z
    dens = _Density.start()
    p = 0.0
    for k in range(look):
        a_grid = min(eff[k], _ZMAX)
        p += dens.prob_above(eff[k], t[k], 0.0) if np.isfinite(eff[k]) else 0.0
        dens = dens.advance(_continue_region(a_grid, 0.0, two) if two else [(-_ZMAX, a_grid)],
                            t[k], 0.0)
    p += dens.prob_above(stat, t[look], 0.0)
    return float(min(1.0, 2.0 * p if two else p))


def crossing_probability(fractions, bounds, theta: float = 0.0, alternative: str = "two-sided") -> float:
    """P(theta)(cross the efficacy bounds at some look), ignoring futility; used by tests."""
    t = _check_fractions(fractions)
    two = alternative == "two-sided"
    dens = _Density.start()
    total = 0.0
    for k, tk in enumerate(t):
        a = float(bounds[k])
        total += dens.prob_above(a, tk, theta)
        if two:
            total += dens.prob_between(-math.inf, -a, tk, theta)
        a_grid = min(a, _ZMAX)
        dens = dens.advance(_continue_region(a_grid, 0.0, two) if two else [(-_ZMAX, a_grid)], tk, theta)
    return float(total)

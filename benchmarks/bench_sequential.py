"""Type-I error and runs saved by sequential seeds, by simulation (CPU, a few seconds).

    python benchmarks/bench_sequential.py                       # 10,000 experiments per scenario
    python benchmarks/bench_sequential.py --sweep               # + the spending-shape trade-off
    python benchmarks/bench_sequential.py --msprt               # + an always-valid test for contrast

Each simulated experiment is a baseline and one arm, runs drawn i.i.d. normal with the speedrun's
noise (final val loss sd 0.0015, train time sd 0.06 s), seeds `{min: 3, max: 16, alpha: 0.01}`
run one at a time after the first three (as `ablate run` does), stopping the arm once both its
loss and its time comparison are decided (`ablate.analysis.sequential.simulate`, the same boundaries and
decisions as `arms_to_continue`). The fixed design runs `max` seeds per arm and applies Welch's
test at alpha once.

Per scenario it prints the rejection rate of each comparison (type-I error where the true Δ is
0, power otherwise) for the sequential and the fixed design, the mean runs per arm, and two ratios:
  runs/max   mean runs per arm ÷ max (the fixed design's runs);
  runs/n_eq  mean runs per arm ÷ the runs a fixed design needs for the power the sequential
             design actually reached (n_eq = max where every Δ is 0; blank where power is ~1).
"Design effect" = the Δ at which the fixed design of `max` runs has power 0.8.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without install

from ablate.analysis import stats

from ablate.analysis import group_sequential as stats_seq
import ablate.analysis.sequential as sq  # noqa: E402

LOSS_SD, TIME_SD = 0.0015, 0.06


def _magnitude_alternative(alternative: str) -> str:
    """Power depends on |Δ| only; a one-sided test is evaluated in its own direction."""
    return "two-sided" if alternative == "two-sided" else "greater"


def design_effect(n: int, alpha: float, alternative: str, power: float = 0.8) -> float:
    """Standardised |Δ|/σ at which Welch with n runs per arm (equal sds) has `power`."""
    alternative = _magnitude_alternative(alternative)
    lo, hi = 0.01, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        need = stats.runs_needed(mid, 1.0, 1.0, alpha, power, alternative)
        if need is not None and need <= n:
            hi = mid
        else:
            lo = mid
    return hi


def n_equal_power(effect: float, power: float, plan: sq.SeqPlan) -> float:
    """Fixed runs per arm reaching `power` at standardised `effect`, interpolated between integers."""
    if power <= 0:
        return float("nan")
    alt = _magnitude_alternative(plan.alternative)
    n = stats.runs_needed(effect, 1.0, 1.0, plan.alpha, min(power, 0.9999), alt)
    if n is None:
        return float("nan")
    if n <= 2:
        return float(n)
    lo = stats.welch_power(n - 1, effect, 1.0, 1.0, plan.alpha, alt)
    hi = stats.welch_power(n, effect, 1.0, 1.0, plan.alpha, alt)
    return (n - 1) + (power - lo) / (hi - lo) if hi > lo else float(n)


def scenarios(d: float, alternative: str) -> list[tuple[str, float, float]]:
    """(name, Δ loss in sd units, Δ time in sd units); improvements (Δ < 0) unless testing 'greater'."""
    s = 1.0 if alternative == "greater" else -1.0
    return [
        ("null: no change", 0.0, 0.0),
        ("loss Δ at design effect, time null", s * d, 0.0),
        ("loss and time Δ at design effect", s * d, s * d),
        (f"speed change: time {s * 0.2:+.1f} s, loss null", 0.0, s * 0.2 / TIME_SD),
        ("loss and time Δ at 2× design effect", 2 * s * d, 2 * s * d),
    ]


def run(plan: sq.SeqPlan, n_exp: int, seed: int, round_size: int, n_null: int | None = None) -> list[dict]:
    d = design_effect(plan.max, plan.alpha, plan.alternative)
    rng = np.random.default_rng(seed)
    rows = []
    for name, dl, dt in scenarios(d, plan.alternative):
        n = n_null if (n_null and dl == 0 and dt == 0) else n_exp
        r = sq.simulate(n, plan, {"loss": dl * LOSS_SD, "time": dt * TIME_SD},
                        {"loss": LOSS_SD, "time": TIME_SD}, rng, round_size=round_size)
        asn = float(r.runs_per_arm.mean())
        effects = [(abs(e), r.rejected[c].mean()) for c, e in (("loss", dl), ("time", dt)) if e != 0]
        # n_eq only where power is below 1: with power ~1 any large enough fixed n ties, and a fixed
        # design cannot know in advance how small it could have been
        n_eq = max((n_equal_power(e, p, plan) for e, p in effects), default=float(plan.max)) \
            if all(p < 0.999 for _, p in effects) else float("nan")
        rows.append(dict(
            scenario=name, d_loss=dl, d_time=dt, asn=asn, ratio_max=asn / plan.max, ratio_eq=asn / n_eq,
            n_eq=n_eq, **{f"seq_{c}": float(r.rejected[c].mean()) for c in ("loss", "time")},
            **{f"fix_{c}": float(r.fixed_rejected[c].mean()) for c in ("loss", "time")},
            any_seq=float((r.rejected["loss"] | r.rejected["time"]).mean()),
            n=n, se_rate=float(np.sqrt(plan.alpha * (1 - plan.alpha) / n))))
    return rows


def print_rows(rows: list[dict], plan: sq.SeqPlan) -> None:
    print("| scenario | rejects loss seq / fixed | rejects time seq / fixed | runs/arm | runs/max | runs/n_eq |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['seq_loss']:.4f} / {r['fix_loss']:.4f} | {r['seq_time']:.4f} / "
              f"{r['fix_time']:.4f} | {r['asn']:.2f} | {r['ratio_max']:.3f} | "
              f"{'' if r['ratio_eq'] != r['ratio_eq'] else format(r['ratio_eq'], '.3f')} |")
    null = rows[0]
    both = (null["seq_loss"] + null["seq_time"]) / 2
    half = 1.96 * null["se_rate"] / np.sqrt(2)
    print(f"\ntype-I error (null, {null['n']} experiments, per comparison): loss {null['seq_loss']:.4f}, time "
          f"{null['seq_time']:.4f}; pooled {both:.4f} (95% CI {both - half:.4f}–{both + half:.4f}) vs alpha "
          f"{plan.alpha}; either comparison of an arm {null['any_seq']:.4f}")
    print(f"mean runs per arm ÷ max: null {rows[0]['ratio_max']:.3f}, design effect (loss) {rows[1]['ratio_max']:.3f}, "
          f"(both) {rows[2]['ratio_max']:.3f}; power sequential/fixed at the design effect "
          f"{rows[1]['seq_loss']:.3f}/{rows[1]['fix_loss']:.3f}")


def sweep(plan: sq.SeqPlan, n_exp: int, seed: int) -> None:
    print("\n| gamma efficacy | gamma futility | type-I loss | power at design Δ: seq (fixed) | runs/max null "
          "| runs/max design Δ (loss only) | runs/max design Δ (both) |")
    print("|---|---|---|---|---|---|---|")
    original = sq.design
    d = design_effect(plan.max, plan.alpha, plan.alternative)
    try:
        for ge in (-6.0, -4.0, -2.0, 0.0):
            for gf in (-4.0, -2.0, 0.0, 2.0):
                sq.design = functools.partial(stats_seq.design, gamma_efficacy=ge, gamma_futility=gf)
                sq._design.cache_clear()
                rng = np.random.default_rng(seed)
                out = []
                sign = 1.0 if plan.alternative == "greater" else -1.0
                for dl, dt in ((0.0, 0.0), (sign * d, 0.0), (sign * d, sign * d)):
                    r = sq.simulate(n_exp, plan, {"loss": dl * LOSS_SD, "time": dt * TIME_SD},
                                    {"loss": LOSS_SD, "time": TIME_SD}, rng)
                    out.append(r)
                print(f"| {ge:g} | {gf:g} | {out[0].rejected['loss'].mean():.4f} | "
                      f"{out[1].rejected['loss'].mean():.3f} ({out[1].fixed_rejected['loss'].mean():.3f}) | "
                      f"{out[0].runs_per_arm.mean() / plan.max:.3f} | {out[1].runs_per_arm.mean() / plan.max:.3f} | "
                      f"{out[2].runs_per_arm.mean() / plan.max:.3f} |")
    finally:
        sq.design = original
        sq._design.cache_clear()


def msprt(plan: sq.SeqPlan, n_paths: int, seed: int) -> None:
    """The always-valid alternative, idealised: a Gaussian-mixture SPRT on the same looks.

    Known-variance Brownian motion S_t (drift theta at t = 1), e-process
    E_t = (1 + tau² t)^(-1/2) exp(tau² S_t² / (2 (1 + tau² t))), reject when E_t ≥ 1/alpha.
    An upper bound on what an always-valid t-test could do (unknown variance only loses more).
    """
    theta = stats_seq.design_drift(plan.alpha, "two-sided")
    ns = np.array(list(range(plan.min, plan.max)) + [plan.max])
    t = ns / plan.max
    dt = np.diff(np.concatenate([[0.0], t]))
    rng = np.random.default_rng(seed)
    print("\n| always-valid mixture SPRT (idealised) | tau | rejects | runs/arm (efficacy stops only) |")
    print("|---|---|---|---|")
    for label, drift in (("null", 0.0), ("design effect", theta)):
        path = np.cumsum(rng.normal(size=(n_paths, len(t))) * np.sqrt(dt) + drift * dt, axis=1)
        for tau in (2.0, theta, 5.0):
            e = (1 + tau ** 2 * t) ** -0.5 * np.exp(tau ** 2 * path ** 2 / (2 * (1 + tau ** 2 * t)))
            rej = e >= 1 / plan.alpha
            hit = rej.any(axis=1)
            first = np.where(hit, rej.argmax(axis=1), len(t) - 1)
            print(f"| {label} | {tau:.2f} | {hit.mean():.4f} | {ns[first].mean():.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=10_000, help="simulated experiments per scenario")
    ap.add_argument("--min", type=int, default=3)
    ap.add_argument("--max", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--alternative", default="two-sided", choices=stats.ALTERNATIVES)
    ap.add_argument("--round-size", type=int, default=1, help="seeds per arm per round after the first min")
    ap.add_argument("--null-experiments", type=int, default=None,
                    help="experiments for the null scenario (default: --experiments); more narrows the type-I CI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="also sweep the spending-function shapes")
    ap.add_argument("--msprt", action="store_true", help="also simulate an always-valid mixture SPRT")
    args = ap.parse_args(argv)
    if args.experiments < 100:
        print(f"--experiments={args.experiments}: use at least 100", file=sys.stderr)
        return 2
    plan = sq.SeqPlan(args.min, args.max, args.alpha, "baseline", None, args.alternative)  # simulated arms
    t0 = time.perf_counter()
    d = design_effect(plan.max, plan.alpha, plan.alternative)
    print(f"seeds {{min: {plan.min}, max: {plan.max}, alpha: {plan.alpha}}}, {plan.alternative}, "
          f"round size {args.round_size}, {args.experiments} experiments per scenario, seed {args.seed}")
    print(f"spending: HSD gamma efficacy {stats_seq.GAMMA_EFFICACY:g}, futility {stats_seq.GAMMA_FUTILITY:g} "
          f"(non-binding); design effect {d:.3f} sd = loss Δ {d * LOSS_SD:.5f}, time Δ {d * TIME_SD:.4f} s\n")
    print_rows(run(plan, args.experiments, args.seed, args.round_size, args.null_experiments), plan)
    if args.sweep:
        sweep(plan, max(args.experiments // 2, 100), args.seed)
    if args.msprt:
        msprt(plan, args.experiments * 20, args.seed)
    print(f"\nelapsed {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

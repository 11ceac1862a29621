"""The run matrix: which (arm, seed) runs an experiment needs, in which order, and what is left.

    python -m ablate run experiments/smoke.yaml --dry-run     # prints this matrix and the plan

Order is seed-major with arms interleaved (seed 0: baseline, a, b; seed 1: baseline, a, b; ...),
so on a busy cluster baseline and variants alternate on the same nodes over time and node
drift hits every arm alike. A run's identity is (arm, seed, config_hash): running a spec again
skips identities that already have an `ok` row, retries failed ones while attempts remain, and
runs an arm again when its overrides (hence its hash) changed. A `diverged` row (non-finite loss)
is an outcome like `ok`: that identity is not run again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from ablate.spec.model import Spec


@dataclass(frozen=True)
class RunRequest:
    """One (arm, seed) run to obtain. `overrides` are the flat dotted trainer overrides."""

    arm: str
    seed: int
    overrides: dict[str, Any] = field(hash=False, compare=False)
    config_hash: str = ""
    round: int = 0  # seed round (sequential seeds), 0-based
    source: str = "ablate"  # "ablate" | "search" | "script" (ablate.spec.script) | "import"
    search_trial: int | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.arm, self.seed, self.config_hash)

    def run_id(self, attempt: int) -> str:
        return f"{self.arm}-s{self.seed}-{self.config_hash}-a{attempt}"


def make_request(spec: Spec, arm: str, seed: int, *, overrides: dict[str, Any] | None = None, round: int = 0,
                 source: str = "ablate", search_trial: int | None = None) -> RunRequest:
    """A request for `arm` (its spec overrides unless `overrides` is given, e.g. by a search).
    CPU specs (gpus_per_run: 0) always get runtime.device: cpu."""
    if spec.is_script_arm(arm):  # a training script (ablate.spec.script): its own source, no trainer overrides
        return RunRequest(arm=arm, seed=seed, overrides=spec.overrides(arm), config_hash=spec.config_hash(arm),
                          round=round, source="script", search_trial=search_trial)
    ov = spec.overrides(arm) if overrides is None else dict(overrides)
    if spec.resources.gpus_per_run == 0:
        ov.setdefault("runtime.device", "cpu")
    return RunRequest(arm=arm, seed=seed, overrides=ov, config_hash=spec.config_hash(arm, ov), round=round,
                      source=source, search_trial=search_trial)


def expand(spec: Spec, seeds: Iterable[int] | None = None, arms: Iterable[str] | None = None,
           round: int = 0) -> list[RunRequest]:
    """Seed-major, arms interleaved in spec order. Defaults: every arm, the spec's seeds (or
    the first `min` seeds of a sequential spec)."""
    if seeds is None:
        seeds = list(range(spec.seeds.min)) if spec.sequential else spec.seeds  # type: ignore[union-attr]
    arm_list = list(spec.arms) if arms is None else [a for a in spec.arms if a in set(arms)]
    base = {a: make_request(spec, a, 0, round=round) for a in arm_list}
    return [replace(base[a], seed=s) for s in seeds for a in arm_list]


@dataclass
class PlannedRun:
    request: RunRequest
    state: str  # "done" (an ok or diverged row exists), "exhausted" (no attempts left), "todo"
    attempt: int  # attempt number the next launch gets (1-based)
    attempts_left: int
    done_run_id: str | None = None


def plan(requests: list[RunRequest], runs_df, retries: int) -> list[PlannedRun]:
    """What to do with each request given the store's runs (pandas DataFrame, may be empty).

    Attempts are counted per identity across invocations: at most 1 + retries failed attempts;
    cancelled attempts (driver interrupted) do not count against the budget. An identity with an
    `ok` row, else a `diverged` row (its loss went non-finite: retrying the same config and seed
    would diverge again), is done; `done_run_id` names that row."""
    by_key: dict[tuple, list[dict]] = {}
    if runs_df is not None and len(runs_df):
        cols = ["arm", "seed", "config_hash", "status", "attempt", "run_id"]
        for rec in runs_df[cols].to_dict("records"):
            by_key.setdefault((rec["arm"], int(rec["seed"]), rec["config_hash"]), []).append(rec)
    out = []
    for req in requests:
        prior = by_key.get(req.key, [])
        ok = [r for r in prior if r["status"] == "ok"] or [r for r in prior if r["status"] == "diverged"]
        failed = sum(r["status"] == "failed" for r in prior)
        attempt = max((int(r["attempt"]) for r in prior), default=0) + 1
        left = retries + 1 - failed
        if ok:
            out.append(PlannedRun(req, "done", attempt, left, done_run_id=ok[0]["run_id"]))
        elif left <= 0:
            out.append(PlannedRun(req, "exhausted", attempt, 0))
        else:
            out.append(PlannedRun(req, "todo", attempt, left))
    return out


def resource_plan(spec: Spec) -> dict[str, Any]:
    """Per-run resources as the orchestrator will request them."""
    r = spec.resources
    return {
        "ranks_per_run": r.ranks,
        "device": "cuda" if r.gpus_per_run else "cpu",
        "bundle": r.bundle(),
        "omp_num_threads": r.omp_threads,
        "timeout_s": r.timeout_s,
        "max_runs": len(spec.arms) * len(spec.max_seeds),
    }


DONE_STATUSES = ("ok", "diverged")  # outcomes: never run again


def missing_runs(spec: Spec, runs_df) -> tuple[dict[str, int], str | None]:
    """For `ablate status`: per arm, how many of its planned seeds have no outcome (ok or diverged
    row of the arm's current config) yet, and a line about a search's progress (else None).

    A plain spec plans `seeds` (a sequential one its first `min`) for every arm. A search spec
    plans `seeds_per_trial` seeds for each suggestion `t<N>` that has runs, and the confirmation's
    seeds (`confirm.first_seed`..) for the spec's arms and for each confirmed suggestion; its
    `seeds:` field is not used."""
    import pandas as pd

    df = runs_df if runs_df is not None and len(runs_df) else pd.DataFrame(
        columns=["arm", "seed", "config_hash", "status", "source"])
    done = df[df["status"].isin(DONE_STATUSES)]

    def missing(arm: str, seeds: Iterable[int], rows) -> int:
        have = set(rows.loc[rows["arm"] == arm, "seed"].astype(int))
        return sum(s not in have for s in seeds)

    if spec.search is None:
        seeds = range(spec.seeds.min) if spec.sequential else spec.max_seeds  # type: ignore[union-attr]
        return {arm: missing(arm, seeds, done[done["config_hash"] == spec.config_hash(arm)]) for arm in spec.arms}, None
    cfg = spec.search_config()
    confirm = range(cfg.confirm.first_seed, cfg.confirm.first_seed + cfg.confirm.seeds) if cfg.confirm else range(0)
    source = df["source"] if "source" in df else pd.Series("ablate", index=df.index)
    search_done, conf_done = done[source.loc[done.index] == "search"], done[source.loc[done.index] != "search"]
    out = {arm: missing(arm, confirm, conf_done[conf_done["config_hash"] == spec.config_hash(arm)])
           for arm in spec.arms} if cfg.confirm else {}
    trials = sorted(set(df.loc[source == "search", "arm"]), key=lambda a: (len(a), a))
    confirmed = set(df.loc[source != "search", "arm"]) - set(spec.arms)
    for arm in trials + sorted(confirmed - set(trials)):
        out[arm] = missing(arm, cfg.seeds(), search_done) if arm in trials else 0
        if arm in confirmed:
            out[arm] += missing(arm, confirm, conf_done)
    note = (f"search: {len(trials)} of {cfg.trials} suggestions have runs ({cfg.seeds_per_trial} seeds each); "
            + (f"confirmation on seeds {confirm.start}..{confirm.stop - 1}" if cfg.confirm else "no confirmation"))
    return out, note

"""The search driver: Optuna suggestions evaluated on several seeds through Ray Tune, then a
properly powered confirmation of the best ones next to the baseline.

    ablate run experiments/lr_mul_search.yaml          # a spec with `search:` runs this

    from ablate.search.driver import run_search
    outcome = run_search(load_spec("experiments/lr_mul_search_tiny.yaml"), Store("results"))

How it runs (docs/search.md):
  * Waves. Each wave asks Optuna for up to max(1, max_concurrent // seeds_per_trial) suggestions
    (TPE's constant liar spreads suggestions asked together), turns every (suggestion, seed) into
    a run request (arm `t<number>`, source "search", search_trial=<number>, seeds 0..k-1) and hands
    the wave to `ablate.run.driver.run_requests`: the same Tune trainable, retries and Parquet
    writes as every other run. When the wave is back, each suggestion is told the mean of its
    seeds' objectives; a seed that failed after its retries (or ended with a non-finite loss)
    fails the whole suggestion. Optuna's ask/tell lives on the driver, so the seed grouping,
    failure rule and multi-objective handling are ours (Tune's Repeater gets all three wrong).
  * Resume. The study is in persistent storage (ablate.search.study). Trials still RUNNING from an
    interrupted session are evaluated again under the same number and arm, and run_requests finds
    their finished seeds in the store, so nothing is re-run and no point is re-suggested. The
    loop stops when `trials` suggestions have finished (complete or failed).
  * Confirmation (`confirm:`): the top-k suggestions (two objectives: the Pareto front by loss)
    run as arms `t<number>` beside every spec arm on fresh seeds, seed-major and interleaved,
    with source "ablate", so `ablate table` gives the significance table for them.
One driver per experiment at a time (the experiment lock, ablate.store.lock): two drivers would both
resume the same RUNNING trials.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablate.errors import Interrupted, SpecError
from ablate.spec.matrix import RunRequest, make_request
from ablate.run.driver import LaunchOptions, RunResult, held_lock, prepare_experiment, ray_session, run_requests
from ablate.run.placement import max_concurrency
from ablate.spec.search_space import SearchConfig, base_values
from ablate.spec.model import Spec
from ablate.store.parquet import Store
from ablate.search.study import (
    ATTR_ARM, ATTR_BASELINE, ATTR_CONFIRMED, ATTR_ERROR, ATTR_INTERRUPTED, ATTR_MEAN, ATTR_N, ATTR_PER_SEED,
    ATTR_SEEDS, ATTR_STD, SEARCH_INFO, counts_toward_budget, open_study, ranked, storage_url,
)
from trainer.config import ConfigError

log = logging.getLogger("ablate")


@dataclass
class SearchOutcome:
    """What one `run_search` call did."""

    storage: str  # the study's storage URL (open it with optuna-dashboard)
    study_name: str
    evaluated: list[int] = field(default_factory=list)  # trial numbers finished in this call
    complete: int = 0  # complete suggestions in the study
    failed: int = 0  # failed suggestions in the study
    confirmed: list[int] = field(default_factory=list)  # trial numbers run in the confirmation
    results: list[RunResult] = field(default_factory=list)  # every run request of this call
    confirmation: list[RunResult] = field(default_factory=list)  # the confirmation's requests only


def arm_name(number: int) -> str:
    return f"t{number}"


def _requests_for(spec: Spec, cfg: SearchConfig, trial: FrozenTrial) -> list[RunRequest]:
    """One request per seed; ConfigError when the combination of values is invalid."""
    ov = {**spec.overrides(spec.baseline), **cfg.to_overrides(trial.params)}
    return [make_request(spec, arm_name(trial.number), seed, overrides=ov, round=0, source="search",
                         search_trial=trial.number) for seed in cfg.seeds()]


def _objective_values(cfg: SearchConfig, row: dict | None) -> list[float] | None:
    """[val loss] or [val loss, train time in s] of a run row; None when missing or non-finite."""
    if not row:
        return None
    loss, ms = row.get("final_val_loss"), row.get("train_time_ms")
    vals = [loss] + ([None if ms is None else ms / 1000.0] if cfg.multi_objective else [])
    if any(v is None or not math.isfinite(float(v)) for v in vals):
        return None
    return [float(v) for v in vals]


def _mean_std(columns: list[list[float]]) -> tuple[list[float], list[float | None]]:
    means, stds = [], []
    for col in zip(*columns):
        n = len(col)
        m = sum(col) / n
        means.append(m)
        stds.append(math.sqrt(sum((x - m) ** 2 for x in col) / (n - 1)) if n > 1 else None)
    return means, stds


def _tell(study: optuna.Study, cfg: SearchConfig, trial: FrozenTrial, results: list[RunResult]) -> bool:
    """Tell one suggestion the mean over its seeds, or FAIL if any seed failed. True if complete."""
    per_seed: dict[str, list[float]] = {}
    problems: list[str] = []
    for res in results:
        vals = _objective_values(cfg, res.row) if res.ok else None
        if vals is None:
            why = (res.row or {}).get("error") if not res.ok else "non-finite final_val_loss/train_time"
            problems.append(f"seed {res.request.seed} {res.status}: {(why or 'no result')[:300]}")
        else:
            per_seed[str(res.request.seed)] = vals
    attrs = {ATTR_ARM: arm_name(trial.number), ATTR_SEEDS: cfg.seeds(), ATTR_PER_SEED: per_seed,
             ATTR_N: len(per_seed)}
    if per_seed:
        means, stds = _mean_std(list(per_seed.values()))
        attrs.update({ATTR_MEAN: means, ATTR_STD: stds})
    if problems:
        attrs[ATTR_ERROR] = "; ".join(problems)[:2000]
    _set_attrs(study, trial, attrs)
    if problems or len(per_seed) != len(cfg.seeds()):
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("suggestion %s failed: %s", arm_name(trial.number), attrs.get(ATTR_ERROR, "missing seeds"))
        return False
    study.tell(trial.number, attrs[ATTR_MEAN] if cfg.multi_objective else attrs[ATTR_MEAN][0])
    return True


def _set_attrs(study: optuna.Study, trial: FrozenTrial, attrs: dict[str, Any]) -> None:
    """User attributes on a trial that may have been asked by an earlier session."""
    live = optuna.trial.Trial(study, trial._trial_id)
    for k, v in attrs.items():
        live.set_user_attr(k, v)


def _trial(study: optuna.Study, number: int) -> FrozenTrial:
    return study.get_trials(deepcopy=False)[number]  # numbers are 0..n-1 within a study


def _fail_config(study: optuna.Study, trial: FrozenTrial, err: Exception) -> None:
    _set_attrs(study, trial, {ATTR_ARM: arm_name(trial.number), ATTR_ERROR: f"invalid config: {err}"[:2000]})
    study.tell(trial.number, state=TrialState.FAIL)
    log.warning("suggestion %s is not a valid trainer config: %s", arm_name(trial.number), err)


def _enqueue_baseline(study: optuna.Study, cfg: SearchConfig, spec: Spec) -> None:
    """First suggestion of a new study = the base config's values, when they lie inside the space."""
    if not cfg.enqueue_baseline or study.trials:
        return
    params = cfg.encode(base_values(cfg, spec.resolve(spec.baseline)))
    if params is None:
        log.info("search: the base config lies outside the space; not enqueued as the first suggestion")
        return
    study.enqueue_trial(params, user_attrs={ATTR_BASELINE: True})


def _wave(study: optuna.Study, cfg: SearchConfig, width: int) -> list[FrozenTrial]:
    """Up to `width` suggestions: RUNNING ones left by an interrupted session first, then new asks
    while the budget (`trials` finished or in flight) allows."""
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    finished = sum(counts_toward_budget(t) for t in trials)
    wave = running[:width]
    budget = cfg.trials - finished - len(running)
    dists = cfg.distributions()
    while len(wave) < width and budget > 0:
        wave.append(_trial(study, study.ask(dists).number))
        budget -= 1
    return wave


def _run_wave(spec: Spec, cfg: SearchConfig, study: optuna.Study, wave: list[FrozenTrial], store: Store,
              chunk: int | None, progress: Any, options: LaunchOptions | None, lock: Any = None) -> list[RunResult]:
    by_trial: dict[int, list[RunRequest]] = {}
    for t in wave:
        if set(t.params) != set(cfg.space):  # asked when the driver was stopped: nothing ran
            _set_attrs(study, t, {ATTR_INTERRUPTED: True})
            study.tell(t.number, state=TrialState.FAIL)
            continue
        try:
            by_trial[t.number] = _requests_for(spec, cfg, t)
        except (ConfigError, SpecError) as e:
            _fail_config(study, t, e)
    # seed-major, suggestions interleaved: seed 0 of every suggestion, then seed 1, ...
    requests = [reqs[i] for i in range(len(cfg.seeds())) for reqs in by_trial.values()]
    results: list[RunResult] = []
    chunk = chunk or len(requests) or 1
    for i in range(0, len(requests), chunk):
        results += run_requests(spec, requests[i:i + chunk], store, progress=progress, options=options, lock=lock)
    by_key = {r.request.key: r for r in results}
    for number, reqs in by_trial.items():
        _tell(study, cfg, _trial(study, number), [by_key[r.key] for r in reqs])
    return results


def confirmation_requests(spec: Spec, cfg: SearchConfig, study: optuna.Study) -> tuple[list[int], list[RunRequest]]:
    """The confirmation's trial numbers and requests: spec arms (baseline first) and the top-k
    suggestions, seeds first_seed.., seed-major. Suggestions equal to the baseline config are skipped."""
    if cfg.confirm is None:
        return [], []
    base_hash = spec.config_hash(spec.baseline)
    chosen: list[tuple[int, dict]] = []
    for t in ranked(study, len(study.trials)):
        ov = {**spec.overrides(spec.baseline), **cfg.to_overrides(t.params)}
        if spec.config_hash(spec.baseline, ov) == base_hash:
            continue
        chosen.append((t.number, ov))
        if len(chosen) == cfg.confirm.top_k:
            break
    if not chosen:
        log.warning("search: no complete suggestion differs from the baseline; nothing to confirm")
        return [], []
    arms = [spec.baseline] + [a for a in spec.arms if a != spec.baseline]
    seeds = range(cfg.confirm.first_seed, cfg.confirm.first_seed + cfg.confirm.seeds)
    reqs: list[RunRequest] = []
    for seed in seeds:
        reqs += [make_request(spec, a, seed) for a in arms]
        reqs += [make_request(spec, arm_name(n), seed, overrides=ov, search_trial=n) for n, ov in chosen]
    return [n for n, _ in chosen], reqs


def study_location(spec: Spec, cfg: SearchConfig, store: Store) -> tuple[str, str]:
    """(storage URL, study name) of the spec's study."""
    return storage_url(store.uri, spec.name, cfg.storage), cfg.study_name or spec.name


def run_search(spec: Spec, store: Store, address: str | None = None, *, progress: Any = None,
               options: LaunchOptions | None = None, lock: Any = None, take_over: bool = False) -> SearchOutcome:
    """Run (or resume) the spec's search, then its confirmation. Raises Interrupted when stopped;
    running it again continues the same study. Holds the experiment's lock (`lock` if the caller
    took it, else taken here)."""
    cfg = spec.search_config()
    url, name = study_location(spec, cfg, store)
    with held_lock(store, spec.name, lock, take_over, progress) as lock:
        study = open_study(cfg, name, url)  # refuses a study made for another space: before any write
        prepare_experiment(spec, store, progress)
        store.write_bytes(spec.name, SEARCH_INFO, json.dumps({"storage": url, "study_name": name}).encode())
        return _search(spec, cfg, study, store, address, url, name, progress, options, lock)


def _search(spec: Spec, cfg: SearchConfig, study: optuna.Study, store: Store, address: str | None, url: str,
            name: str, progress: Any, options: LaunchOptions | None, lock: Any) -> SearchOutcome:
    _enqueue_baseline(study, cfg, spec)
    out = SearchOutcome(storage=url, study_name=name)
    with ray_session(address):
        import ray

        fits = max_concurrency(spec, ray.nodes())
        if options is not None and options.autoscale and cfg.max_concurrent:
            fits = max(fits, cfg.max_concurrent)  # the autoscaler adds the nodes (run_requests does not cap)
        cap = min(cfg.max_concurrent or fits, fits)
        width = max(1, cap // cfg.seeds_per_trial)
        try:
            while wave := _wave(study, cfg, width):
                # run_requests keeps `fits` runs in flight; chunks hold a lower max_concurrent
                chunk = cap if cap < fits else None
                out.results += _run_wave(spec, cfg, study, wave, store, chunk, progress, options, lock)
                out.evaluated += [t.number for t in wave]
            numbers, reqs = confirmation_requests(spec, cfg, study)
            if reqs:
                study.set_user_attr(ATTR_CONFIRMED, numbers)
                out.confirmed = numbers
                out.confirmation = run_requests(spec, reqs, store, progress=progress, options=options, lock=lock)
                out.results += out.confirmation
        except KeyboardInterrupt:  # between waves; inside a wave run_requests raises Interrupted
            raise Interrupted("interrupted: finished runs are in the store and the study keeps every told "
                              "suggestion; run the same spec again to continue the search") from None
    states = [t.state for t in study.get_trials(deepcopy=False)]
    out.complete = states.count(TrialState.COMPLETE)
    out.failed = states.count(TrialState.FAIL)
    return out


def describe_search(spec: Spec, store: Store) -> Any:
    """What `ablate run SPEC --dry-run` shows for a search: space, budget, study state,
    confirmation plan. Starts nothing and writes nothing (an absent study is not created)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ablate.spec.matrix import resource_plan
    from ablate.spec.search_space import FloatParam, IntParam

    cfg = spec.search_config()
    url, name = study_location(spec, cfg, store)
    base = base_values(cfg, spec.resolve(spec.baseline))
    space = Table("key", "type", "range / values", "base value", title=Text(f"{spec.name}: search space"))
    for key, p in cfg.space.items():
        if isinstance(p, (FloatParam, IntParam)):
            rng = f"[{p.low:g}, {p.high:g}]" + (" log" if p.log else "") + (f" step {p.step:g}" if p.step else "")
        else:
            rng = " | ".join(json.dumps(list(v)) if isinstance(v, tuple) else json.dumps(v) for v in p.values)
        space.add_row(*(Text(str(c)) for c in (key, p.type, rng, json.dumps(base[key]))))  # never markup
    objective = "mean final val loss" if not cfg.multi_objective else \
        "mean final val loss and mean train time (Pareto front)"
    lines = [f"sampler {cfg.sampler} (seed {cfg.sampler_seed}); {cfg.trials} suggestions × "
             f"{cfg.seeds_per_trial} seeds (0..{cfg.seeds_per_trial - 1}); objective: {objective}; "
             f"max_concurrent {cfg.max_concurrent or 'whole bundles that fit on the cluster'}"]
    state = "new (created on the first run)"
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if path is None or os.path.exists(path):
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=name, storage=url)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            state = (f"{states.count(TrialState.COMPLETE)} complete, {states.count(TrialState.FAIL)} failed, "
                     f"{states.count(TrialState.RUNNING)} interrupted (resumed first) of {cfg.trials}")
        except Exception as e:  # noqa: BLE001 (a dry run reports, it does not fail)
            state = f"cannot be read ({type(e).__name__}: {e})"
    lines.append(f"study {name!r} in {url}: {state}")
    runs = cfg.trials * cfg.seeds_per_trial
    if cfg.confirm is not None:
        c = cfg.confirm
        n_conf = (len(spec.arms) + c.top_k) * c.seeds
        lines.append(f"confirmation: top {c.top_k} + {', '.join(spec.arms)} on seeds {c.first_seed}.."
                     f"{c.first_seed + c.seeds - 1}, interleaved = {n_conf} runs")
        runs += n_conf
    rp = resource_plan(spec)
    dev = f"{rp['ranks_per_run']} GPU rank(s)" if rp["device"] == "cuda" else f"{rp['ranks_per_run']} CPU rank(s)"
    lines.append(f"per run: {dev}, Ray bundle {{CPU: {rp['bundle']['CPU']:g}, GPU: {rp['bundle']['GPU']:g}}}; "
                 f"at most {runs} runs (+ retries)")
    lines.append(f"dashboard: optuna-dashboard {url}")
    return Group(space, *(Text(line) for line in lines))

"""The Optuna study behind a search experiment: where it lives, its sampler, its Pareto front.

    from ablate.search.study import open_study, storage_url
    url = storage_url(store_uri="results", experiment="lr-mul-search", explicit=cfg.storage)
    study = open_study(cfg, study_name="lr-mul-search", url=url)

One study per experiment, in persistent storage so `ablate run` after an interrupt continues it:
  * local store  → `sqlite:///<store>/<experiment>/optuna.db` (next to the Parquet runs);
  * remote store → `sqlite:///<cwd>/.ablate/optuna/<experiment>.db` (SQLite cannot live on S3);
  * `search.storage` → any RDB URL Optuna accepts (postgresql://, mysql://, sqlite:///...).
Open it with `optuna-dashboard <url>`.

Per-trial bookkeeping lives in Optuna user attributes (names below), written by ablate.search.driver:
the arm name, seeds, per-seed objective values, n / mean / std, the error of a failed
suggestion, and whether a FAIL only means "interrupted before its params were drawn".
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ablate.spec.search_space import SearchConfig, SearchSpaceError

SEARCH_INFO = "search.json"  # in the store's experiment folder: {"storage": url, "study_name": name}

# Study user attributes
ATTR_CONFIRMED = "confirmed"  # trial numbers sent to the confirmation
ATTR_FINGERPRINT = "ablate_fingerprint"  # SearchConfig.fingerprint() at creation
ATTR_OBJECTIVES = "ablate_objectives"
# Trial user attributes
ATTR_ARM = "arm"  # "t<number>"
ATTR_SEEDS = "seeds"  # list of seeds the suggestion is evaluated on
ATTR_PER_SEED = "per_seed"  # {seed: [objective values]} of the runs that finished ok
ATTR_N = "n"
ATTR_MEAN = "mean"  # [mean per objective]
ATTR_STD = "std"  # [sample std per objective], null for n == 1
ATTR_ERROR = "error"  # why the suggestion failed
ATTR_INTERRUPTED = "interrupted"  # FAIL only because the driver stopped mid-ask; not counted
ATTR_BASELINE = "baseline"  # the enqueued base-config point

DIRECTION = "minimize"  # val loss and train time are both minimised


def is_local(uri: str) -> bool:
    """True for a plain path or file:// URI (where a SQLite file can sit next to the results)."""
    scheme = urlparse(str(uri)).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(uri: str) -> Path:
    u = urlparse(str(uri))
    return Path(u.path if u.scheme == "file" else str(uri)).expanduser().resolve()


def storage_url(store_uri: str, experiment: str, explicit: str | None = None) -> str:
    """The study's storage URL: explicit RDB URL, else a SQLite file chosen as documented above."""
    if explicit:
        return explicit
    if is_local(store_uri):
        path = _local_path(store_uri) / experiment / "optuna.db"
    else:
        path = Path.cwd().resolve() / ".ablate" / "optuna" / f"{experiment}.db"
    return f"sqlite:///{path}"


def _storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # A dashboard reading the file while the driver writes: wait instead of "database is locked".
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    return optuna.storages.RDBStorage(url)


def make_sampler(cfg: SearchConfig, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    """Sampler from cfg; its seed is offset by the trials already in the study, so a resumed
    study does not replay the random draws of the first session."""
    seed = cfg.sampler_seed + n_existing
    startup = cfg.n_startup_trials or min(10, max(2, cfg.trials // 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if cfg.sampler == "tpe":
            # constant_liar: suggestions in flight count as pessimistic results, so concurrent
            # asks spread out instead of piling onto the same point.
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                              multivariate=True, constant_liar=True)
        if cfg.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        pop = cfg.population_size or min(50, max(4, cfg.trials // 3))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    raise SearchSpaceError(f"search.sampler={cfg.sampler!r} is invalid: use tpe, gp, nsga2 or random")


def open_study(cfg: SearchConfig, study_name: str, url: str) -> optuna.Study:
    """Create the study, or load it and check it was made for the same space and objectives."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(url)
    directions = [DIRECTION] * len(cfg.objectives)
    names = optuna.study.get_all_study_names(storage)
    if study_name in names:
        study = optuna.load_study(study_name=study_name, storage=storage)
        old = study.user_attrs.get(ATTR_FINGERPRINT)
        if len(study.directions) != len(directions):
            raise SearchSpaceError(
                f"study {study_name!r} in {url} has {len(study.directions)} objective(s) but "
                f"search.objectives is {cfg.objectives}; use a new experiment name or study_name")
        if old is not None and old != cfg.fingerprint():
            raise SearchSpaceError(
                f"study {study_name!r} in {url} was made with a different search space, objectives or "
                f"seeds_per_trial (fingerprint {old} ≠ {cfg.fingerprint()}); resuming would mix "
                "incomparable trials. "
                "Use a new experiment name or search.study_name, or delete the study.")
    else:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions)
        study.set_user_attr(ATTR_FINGERPRINT, cfg.fingerprint())
        study.set_user_attr(ATTR_OBJECTIVES, list(cfg.objectives))
    study.sampler = make_sampler(cfg, n_existing=len(study.trials))
    return study


# --------------------------------------------------------------------------------------------
# Reading a study
# --------------------------------------------------------------------------------------------
def counts_toward_budget(t: FrozenTrial) -> bool:
    """Finished suggestions: complete, pruned, or failed for a reason other than an interrupt."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_INTERRUPTED, False)


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Rows of `points` (n × k, all minimised) that no other row dominates."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or len(pts) == 0:
        return np.zeros(len(pts), dtype=bool)
    ok = np.isfinite(pts).all(axis=1)
    mask = np.zeros(len(pts), dtype=bool)
    for i in np.flatnonzero(ok):
        others = pts[ok]
        dominated = ((others <= pts[i]).all(axis=1) & (others < pts[i]).any(axis=1)).any()
        mask[i] = not dominated
    return mask


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials no other complete trial dominates, sorted by the first objective."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return []
    mask = pareto_mask(np.array([t.values for t in done]))
    return sorted((t for t, m in zip(done, mask) if m), key=lambda t: (t.values[0], t.number))


def ranked(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The best k complete suggestions: by mean val loss, or for two objectives the Pareto front
    sorted by val loss (then the rest by val loss when the front is shorter than k)."""
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                  key=lambda t: (t.values[0], t.number))
    if len(study.directions) == 1:
        return done[:k]
    front = pareto_front(study)
    numbers = {t.number for t in front}
    return (front + [t for t in done if t.number not in numbers])[:k]


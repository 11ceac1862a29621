"""The `search:` block of an experiment spec: the space, the sampler, the objectives, `confirm:`.

    from ablate.spec.search_space import parse_search
    cfg = parse_search(spec.search, preset="small", base_overrides={"schedule.cooldown_frac": 0.55})
    cfg.distributions()              # {dotted key: optuna distribution}, for study.ask()
    cfg.to_overrides(trial.params)   # Optuna's stored values → trainer overrides (tuples decoded)

YAML (see docs/search.md):

    search:
      trials: 24                 # suggestions to evaluate
      seeds_per_trial: 2         # each suggestion runs on seeds 0..k-1; the objective is the mean
      max_concurrent: 4          # runs in flight at once (default: as many as resources allow)
      sampler: tpe               # tpe | gp | nsga2 | random
      sampler_seed: 0
      objectives: [val_loss]     # or [val_loss, train_time] for a Pareto front
      space:
        optim.muon.lr: {type: float, low: 0.015, high: 0.04, log: true}
        model.num_layers: {type: int, low: 4, high: 8}
        schedule.ws_schedule: {type: choice, values: [[3, 7, 11], [3, 7, 11, 13]]}
      confirm: {top_k: 3, seeds: 8}

Every key is checked against the trainer's config tree (unknown keys get the trainer's close-match
message) and every bound / choice value is applied to the resolved base config, so a bad space is
an error before any run starts. Optuna's storage holds only primitives, so list/tuple choice values
are stored as JSON strings ("[3, 7, 11]") and decoded back through the space's own value table.
"""
from __future__ import annotations

import hashlib
import json
import math
import typing
from dataclasses import fields, is_dataclass
from typing import Annotated, Any, Literal, Mapping, Union

from optuna.distributions import (
    BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ablate.errors import SearchSpaceError
from trainer.config import ConfigError, TrainConfig, apply_overrides, valid_keys
from trainer.presets import load_config

OBJECTIVES = {"val_loss": "final_val_loss", "train_time": "train_time_ms"}  # name → runs column
FORBIDDEN_KEYS = {"seed": "seeds are set by seeds_per_trial / confirm.seeds",
                  "preset": "the preset is trainer.preset of the spec"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FloatParam(_Strict):
    """Uniform (or log-uniform) float in [low, high], optionally on a grid of `step`."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "FloatParam":
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low ({self.low}) and high ({self.high}) must be finite numbers")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high}); swap them")
        if self.low == self.high:
            raise ValueError(f"low == high ({self.low}); a fixed value belongs in trainer.set")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got low={self.low}); raise low or set log: false")
        if self.step is not None:
            if self.log:
                raise ValueError("step and log: true cannot be combined; drop one")
            if self.step <= 0:
                raise ValueError(f"step must be > 0 (got {self.step})")
        return self

    def distribution(self) -> BaseDistribution:
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def samples(self) -> list[Any]:
        return [self.low, self.high]


class IntParam(_Strict):
    """Integer in [low, high] with `step` (log spacing needs low ≥ 1 and step 1)."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _check(self) -> "IntParam":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high}); swap them")
        if self.low == self.high:
            raise ValueError(f"low == high ({self.low}); a fixed value belongs in trainer.set")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low ≥ 1 (got low={self.low}); raise low or set log: false")
        if self.step < 1:
            raise ValueError(f"step must be ≥ 1 (got {self.step})")
        if self.log and self.step != 1:
            raise ValueError("log: true needs step 1; drop step or log")
        return self

    def distribution(self) -> BaseDistribution:
        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def samples(self) -> list[Any]:
        return [self.low, self.high]


def _encode(value: Any) -> Any:
    """A choice value as Optuna may store it: primitives as is, lists/tuples as JSON text."""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


class ChoiceParam(_Strict):
    """One of `values`; values may be numbers, strings, booleans or lists such as window schedules."""

    type: Literal["choice"]
    values: list[Any]

    @field_validator("values")
    @classmethod
    def _check_values(cls, values: list[Any]) -> list[Any]:
        if not values:
            raise ValueError("values is empty; list at least two options")
        for v in values:
            if isinstance(v, dict):
                raise ValueError(f"value {v!r} is a mapping; choices must be numbers, strings, "
                                 "booleans or lists")
            if isinstance(v, (list, tuple)) and any(isinstance(x, (list, tuple, dict)) for x in v):
                raise ValueError(f"value {v!r} is nested; only flat lists are supported")
        encoded = [_encode(v) for v in values]
        dupes = sorted({json.dumps(e) for e in encoded if encoded.count(e) > 1})
        if dupes:
            raise ValueError(f"duplicate values {', '.join(dupes)}; list each option once "
                             "(a string that spells a list counts as that list)")
        if len(values) < 2:
            raise ValueError(f"only one value ({values[0]!r}); a fixed value belongs in trainer.set")
        return [tuple(v) if isinstance(v, list) else v for v in values]

    def encoded(self) -> list[Any]:
        return [_encode(v) for v in self.values]

    def decode(self, stored: Any) -> Any:
        for v in self.values:
            if _encode(v) == stored or (isinstance(stored, (list, tuple)) and _encode(stored) == _encode(v)):
                return list(v) if isinstance(v, tuple) else v
        raise SearchSpaceError(f"stored choice {stored!r} is not one of {self.values!r}; the study "
                               "was made with a different space")

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution(self.encoded())

    def samples(self) -> list[Any]:
        return [list(v) if isinstance(v, tuple) else v for v in self.values]


Param = Annotated[Union[FloatParam, IntParam, ChoiceParam], Field(discriminator="type")]


INT64_MAX = 2**63 - 1  # seeds are int64 in the store
MAX_SEEDS = 10_000  # as ablate.spec.model.MAX_SEEDS


class ConfirmConfig(_Strict):
    """Re-run the best `top_k` suggestions next to the baseline on fresh seeds, interleaved."""

    top_k: int = Field(3, ge=1, le=1000)
    seeds: int = Field(8, ge=2, le=MAX_SEEDS)
    # Confirmation seeds are first_seed..first_seed+seeds-1: fresh seeds (no winner's curse from
    # re-using the seeds a suggestion was selected on) and distinct run ids from the search runs.
    first_seed: int = Field(1000, ge=0, le=INT64_MAX - MAX_SEEDS)


class SearchConfig(_Strict):
    """The validated `search:` block."""

    space: dict[str, Param]
    trials: int = Field(ge=1, le=100_000)
    seeds_per_trial: int = Field(2, ge=1, le=MAX_SEEDS)
    max_concurrent: int | None = Field(None, ge=1)
    sampler: Literal["tpe", "gp", "nsga2", "random"] = "tpe"
    sampler_seed: int = Field(0, ge=0, le=2**31)  # + trials so far must stay below 2**32 (numpy)
    # Random (startup) suggestions before TPE / GP model the results; None = Optuna's default
    # capped at a third of `trials`. NSGA-II: population size, None = min(50, max(4, trials//3)).
    n_startup_trials: int | None = Field(None, ge=1)
    population_size: int | None = Field(None, ge=2)
    objectives: list[Literal["val_loss", "train_time"]] = ["val_loss"]
    storage: str | None = None  # RDB URL; default sqlite file next to the results (docs/search.md)
    study_name: str | None = None  # default: the experiment name
    enqueue_baseline: bool = True  # first suggestion = the base config's values when inside the space
    # Early stopping of poor suggestions: off, and `true` is refused (docs/search.md, "Pruning").
    pruning: bool = False
    confirm: ConfirmConfig | None = None

    @field_validator("space")
    @classmethod
    def _nonempty(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise ValueError("space is empty; add at least one dotted trainer key")
        return space

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objs: list[str]) -> list[str]:
        if objs not in (["val_loss"], ["val_loss", "train_time"]):
            raise ValueError(f"{objs!r} is not supported; use [val_loss] or [val_loss, train_time]")
        return objs

    @field_validator("pruning")
    @classmethod
    def _pruning(cls, on: bool) -> bool:
        if on:
            raise ValueError("true is not supported: val loss early in a speedrun run predicts its final loss "
                             "poorly (the LR cooldown and window growth reorder runs late), and ablate does not "
                             "stop runs early; use more seeds_per_trial or fewer trials instead (docs/search.md)")
        return on

    @field_validator("storage")
    @classmethod
    def _storage(cls, url: str | None) -> str | None:
        if url is not None and "://" not in url:
            raise ValueError(f"{url!r} is not an RDB URL; e.g. sqlite:///path/optuna.db or "
                             "postgresql://user@host/db")
        return url

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) == 2

    @property
    def metric_columns(self) -> list[str]:
        """The runs-table columns behind the objectives, in order."""
        return [OBJECTIVES[o] for o in self.objectives]

    def seeds(self) -> list[int]:
        return list(range(self.seeds_per_trial))

    def distributions(self) -> dict[str, BaseDistribution]:
        return {k: p.distribution() for k, p in self.space.items()}

    def to_overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna params (as stored) → trainer overrides; list choices come back as lists."""
        out: dict[str, Any] = {}
        for key, p in self.space.items():
            if key not in params:
                raise SearchSpaceError(f"trial params {dict(params)!r} lack {key!r}; the study was "
                                       "made with a different space")
            v = params[key]
            if isinstance(p, ChoiceParam):
                v = p.decode(v)
            elif isinstance(p, IntParam):
                v = int(v)
            else:
                v = float(v)
            out[key] = v
        return out

    def encode(self, overrides: Mapping[str, Any]) -> dict[str, Any] | None:
        """Trainer values → Optuna params (e.g. for enqueue_trial); None if one lies outside."""
        out: dict[str, Any] = {}
        for key, p in self.space.items():
            v = overrides[key]
            if isinstance(p, ChoiceParam):
                enc = _encode(v)
                if enc not in p.encoded():
                    return None
                out[key] = enc
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not p.low <= v <= p.high:
                return None
            else:
                out[key] = int(v) if isinstance(p, IntParam) else float(v)
        return out

    def fingerprint(self) -> str:
        """Hash of what makes trial values comparable: space, objectives, seeds per trial."""
        blob = json.dumps({"space": {k: p.model_dump(mode="json") for k, p in sorted(self.space.items())},
                           "objectives": self.objectives, "seeds_per_trial": self.seeds_per_trial},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Checks against the trainer's config tree
# --------------------------------------------------------------------------------------------
def leaf_type(key: str) -> Any:
    """The annotated type of a dotted key of TrainConfig (KeyError when unknown)."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and is_dataclass(cls)) or part not in {f.name for f in fields(cls)}:
            raise KeyError(key)
        cls = typing.get_type_hints(cls)[part]
        if i < len(parts) - 1 and not (isinstance(cls, type) and is_dataclass(cls)):
            raise KeyError(key)
    return cls


def _type_problem(key: str, param: Any, t: Any) -> str | None:
    if isinstance(param, ChoiceParam):
        return None  # every value is applied below
    if t is bool or typing.get_origin(t) in (Literal, tuple) or t is str:
        return (f"search.space.{key}: type {param.type} does not fit a {_tname(t)} setting; "
                "use type: choice with values")
    if isinstance(param, FloatParam) and t is int:
        return f"search.space.{key}: the setting is an integer; use type: int"
    return None


def _tname(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one-of " + "/".join(map(str, typing.get_args(t)))
    if origin is tuple:
        return "list"
    return getattr(t, "__name__", str(t))


def check_against_trainer(cfg: SearchConfig, preset: str, base_overrides: Mapping[str, Any],
                          base_config: Any = None) -> None:
    """Raise SearchSpaceError listing every key or value the trainer would reject (`base_config`:
    the base TrainConfig if already resolved, else preset + base_overrides)."""
    try:
        base = base_config if base_config is not None else load_config(preset, overrides=dict(base_overrides))
    except ConfigError as e:
        raise SearchSpaceError(f"the base config (trainer.preset {preset!r} + trainer.set + "
                               f"baseline arm) is invalid: {e}") from None
    keys = set(valid_keys())
    problems: list[str] = []
    for key, param in cfg.space.items():
        if key in FORBIDDEN_KEYS:
            problems.append(f"search.space.{key}: cannot be searched; {FORBIDDEN_KEYS[key]}")
            continue
        if key not in keys:
            try:
                apply_overrides(base, {key: 0})
            except ConfigError as e:
                problems.append(f"search.space: {e}")
            continue
        msg = _type_problem(key, param, leaf_type(key))
        if msg:
            problems.append(msg)
            continue
        for value in param.samples():
            try:
                apply_overrides(base, {key: value})
            except ConfigError as e:
                label = "value" if isinstance(param, ChoiceParam) else ("low" if value == param.low else "high")
                problems.append(f"search.space.{key}: {label} {value!r} is rejected by the trainer: {e}")
    if problems:
        raise SearchSpaceError(problems)


def _format_validation(e: ValidationError) -> list[str]:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x in ("float", "int", "choice")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
            msg = "needs type: float, int or choice"
        lines.append(f"search.{loc}: {msg}")
    return lines


def parse_search(raw: Mapping[str, Any], *, preset: str,
                 base_overrides: Mapping[str, Any] | None = None, base_config: Any = None) -> SearchConfig:
    """Validate a raw `search:` mapping, then check it against the trainer. Each stage reports
    all of its problems in one SearchSpaceError. `base_config`: the base TrainConfig when the caller
    has already resolved it (ablate.spec.model: the baseline arm's), so it is not resolved again."""
    if not isinstance(raw, Mapping):
        raise SearchSpaceError(f"search must be a mapping, got {type(raw).__name__}")
    try:
        cfg = SearchConfig.model_validate(dict(raw))
    except ValidationError as e:
        raise SearchSpaceError(_format_validation(e)) from None
    check_against_trainer(cfg, preset, base_overrides or {}, base_config)
    return cfg


def base_values(cfg: SearchConfig, base_config: Any) -> dict[str, Any]:
    """The base config's current value of every searched key (tuples as lists); `base_config`: the
    baseline arm's TrainConfig (Spec.resolve(spec.baseline))."""
    from trainer.config import to_dict

    d = to_dict(base_config)
    out: dict[str, Any] = {}
    for key in cfg.space:
        node: Any = d
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out

"""Experiment specs: YAML → one validated, frozen pydantic model; every problem reported at once.

    python -m ablate validate experiments/*.yaml

    from ablate.spec.model import load_spec
    spec = load_spec("experiments/smoke.yaml")
    spec.overrides("lr-0.05")        # flat dotted overrides the trainer gets for that arm
    spec.config_hash("lr-0.05")      # identity of the arm's resolved config (resume key)

The format is documented in docs/spec.md. Nothing here starts Ray or imports torch; the trainer's
config tree (`trainer.config`) checks every override against the chosen preset. Untrusted input is
bounded: at most MAX_SPEC_BYTES of YAML, no YAML aliases (an alias bomb expands a few hundred
bytes into gigabytes), finite numbers only, seeds within int64, at most MAX_SEEDS seeds per arm
and MAX_RUNS runs.
"""
from __future__ import annotations

import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from ablate.errors import SpecError
from ablate.names import ARM_RULE, NAME_RULE, is_arm, is_experiment
from ablate.spec.script import read_stored
from trainer.config import apply_overrides
from trainer.config import flatten as _trainer_flatten
from trainer.presets import get_preset

MAX_SPEC_BYTES = 1024 * 1024  # a spec is a few KB; this bounds what `validate` reads and parses
INT64_MAX = 2**63 - 1  # seeds are int64 in the store
MAX_SEEDS = 10_000  # per arm
MAX_RUNS = 100_000  # arms × seeds of one experiment
MAX_RETRIES = 100
GPU_CHOICES = (0, 1, 2, 4, 8)
RANK_CHOICES = (1, 2, 4, 8)
# Keys an arm may not set: the seed comes from `seeds:`, the preset from `trainer.preset`.
RESERVED_KEYS = {"seed": "seeds:", "preset": "trainer.preset"}
# The trainer override that resources.compile_cache_dir becomes (left out of the config hash).
CACHE_KEY = "runtime.inductor_cache_dir"

# Example values used in "fix:" hints, by dotted field path.
EXAMPLES = {
    "name": "name: muon-lr",
    "description": "description: Muon lr 0.023 vs 0.03",
    "trainer": "trainer: {preset: small, set: {schedule.cooldown_frac: 0.55}}",
    "trainer.preset": "trainer: {preset: tiny}",
    "trainer.set": "trainer: {preset: tiny, set: {optim.muon.lr: 0.03}}",
    "trainer.script": "trainer: {script: train_gpt.py, nproc_per_node: 8}",
    "trainer.files": "trainer: {script: train_gpt.py, files: [triton_kernels.py]}",
    "trainer.nproc_per_node": "trainer: {script: train_gpt.py, nproc_per_node: 8}",
    "trainer.env": "trainer: {script: train_gpt.py, env: {MUON_WD: \"0.02\"}}",
    "trainer.args": "trainer: {script: train_gpt.py, args: [\"--lr\", \"0.03\"]}",
    "trainer.obtain": "trainer: {script: train_gpt.py, obtain: \"git show b72cabd2:train_gpt.py > train_gpt.py\"}",
    "trainer.allow_mixed": "trainer: {preset: speedrun, allow_mixed: true}",
    "arms": "arms: {baseline: {}, lr-0.03: {optim.muon.lr: 0.03}}",
    "baseline": "baseline: baseline",
    "seeds": "seeds: 8  (or [0, 1, 2], or {min: 3, max: 16, alpha: 0.01})",
    "seeds.min": "seeds: {min: 3, max: 16, alpha: 0.01}",
    "seeds.max": "seeds: {min: 3, max: 16, alpha: 0.01}",
    "seeds.alpha": "seeds: {min: 3, max: 16, alpha: 0.01}",
    "resources": "resources: {gpus_per_run: 1}",
    "resources.gpus_per_run": "resources: {gpus_per_run: 1}  (one of 0, 1, 2, 4, 8)",
    "resources.cpu_ranks_per_run": "resources: {gpus_per_run: 0, cpu_ranks_per_run: 2}",
    "resources.cpus_per_run": "resources: {gpus_per_run: 1, cpus_per_run: 4}",
    "resources.timeout_s": "resources: {gpus_per_run: 1, timeout_s: 1800}",
    "resources.compile_cache_dir": "resources: {gpus_per_run: 8, compile_cache_dir: /opt/ablate-cache}",
    "target_loss": "target_loss: 3.28",
    "retries": "retries: 2",
    "analysis": "analysis: {alternative: two-sided, correction: holm, alpha: 0.05}",
    "analysis.alternative": "analysis: {alternative: less}  (two-sided, less or greater)",
    "analysis.correction": "analysis: {correction: holm}  (holm, bh or none)",
    "analysis.alpha": "analysis: {alpha: 0.05}",
    "data_root": "data_root: /mnt/data  (relative paths are taken from the project root)",
    "search": "search: {...}  (see docs/spec.md)",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class TrainerSpec(_Model):
    preset: str | None = None  # a name from trainer/presets.py (or `script:`, never both)
    set: dict[str, Any] = {}  # overrides for every arm, dotted or nested
    # Script experiments: your own torchrun script instead of a preset (ablate/spec/script.py checks these)
    script: str | None = None  # the base script of every arm, relative to the spec file's folder
    files: list[Any] = []  # more files the script reads or imports, placed beside it in each run's folder
    nproc_per_node: int | None = None  # torchrun ranks; must match resources (one rank per GPU)
    env: dict[str, Any] = {}  # environment of every arm's runs (string → string)
    args: list[Any] = []  # command-line arguments of every arm's runs
    obtain: str = ""  # how to get the script when it is absent (quoted in the error)
    allow_mixed: bool = False  # a preset experiment may hold script arms (compared with preset arms)

    @field_validator("set", "env", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("files", "args", mode="before")
    @classmethod
    def _none_is_empty_list(cls, v: Any) -> Any:
        return [] if v is None else v


def _unit_interval(v: float) -> float:
    """The check of every significance level α."""
    if not 0.0 < v < 1.0:
        raise ValueError("must be in (0, 1)")
    return v


Alpha = Annotated[float, AfterValidator(_unit_interval)]


class SequentialSeeds(_Model):
    """Sequential seeds: `min` seeds per arm first, then one more at a time up to `max` for the
    arms `ablate.analysis.sequential.arms_to_continue` keeps (at level `alpha`)."""

    min: int
    max: int
    alpha: Alpha = 0.05

    @field_validator("min", "max")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be ≥ 1")
        if v > MAX_SEEDS:
            raise ValueError(f"must be ≤ {MAX_SEEDS} (seeds per arm)")
        return v


class Resources(_Model):
    gpus_per_run: int = 1  # GPUs per run = torchrun ranks; 0 runs ranks on CPU (gloo)
    cpu_ranks_per_run: int | None = None  # ranks of a CPU run (gpus_per_run: 0); default 1
    cpus_per_run: int | None = None  # Ray CPUs reserved per run; default max(1, ranks)
    timeout_s: float | None = None  # kill a run that takes longer (wall clock); none by default
    # Node-local compile cache root shared by the runs of a node: passed to every run as the
    # trainer override runtime.inductor_cache_dir (<dir>/inductor, <dir>/triton; GPU runs). Not part
    # of the config hash. "" = torch's defaults (/tmp/torchinductor_<user>, ~/.triton: also per node).
    compile_cache_dir: str = ""
    # Keep each slot's trainer processes alive between runs (ablate.run.workers / trainer.serve): later
    # runs skip process start, rendezvous and recompiling (~35 s per run on GPU, docs/performance.md).
    # Results are the same as with fresh processes; a failed run ends its worker.
    reuse_workers: bool = False

    @field_validator("gpus_per_run")
    @classmethod
    def _gpus(cls, v: int) -> int:
        if v not in GPU_CHOICES:
            raise ValueError("must be one of 0, 1, 2, 4, 8 (one torchrun rank per GPU; 0 = CPU ranks)")
        return v

    @field_validator("cpu_ranks_per_run")
    @classmethod
    def _ranks(cls, v: int | None) -> int | None:
        if v is not None and v not in RANK_CHOICES:
            raise ValueError("must be one of 1, 2, 4, 8")
        return v

    @field_validator("cpus_per_run")
    @classmethod
    def _cpus(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be ≥ 1")
        return v

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("must be > 0 seconds")
        return v

    @field_validator("compile_cache_dir")
    @classmethod
    def _cache_dir(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError("must be an absolute path that exists (or can be created) on every node, e.g. "
                             "/opt/ablate-cache; leave it empty for torch's per-node defaults")
        return v

    @model_validator(mode="after")
    def _cpu_ranks_need_cpu_run(self) -> "Resources":
        if self.cpu_ranks_per_run is not None and self.gpus_per_run != 0:
            raise ValueError(f"cpu_ranks_per_run={self.cpu_ranks_per_run} only applies to CPU runs; set "
                             "gpus_per_run: 0 or drop cpu_ranks_per_run")
        return self

    @property
    def ranks(self) -> int:
        """torchrun --nproc_per_node."""
        return self.gpus_per_run or (self.cpu_ranks_per_run or 1)

    @property
    def cpus(self) -> int:
        return self.cpus_per_run or max(1, self.ranks)

    @property
    def omp_threads(self) -> int:
        """OMP_NUM_THREADS of each rank: the run's Ray CPUs shared by its ranks."""
        return max(1, self.cpus // self.ranks)

    def bundle(self) -> dict[str, float]:
        """The run's CPUs and GPUs, in one Ray bundle (never split, see ray-notes). On a cluster
        an 8-GPU run may add `gpu_node: 1`: ablate.run.placement.run_bundle."""
        return {"CPU": float(self.cpus), "GPU": float(self.gpus_per_run)}


class Analysis(_Model):
    alternative: Literal["two-sided", "less", "greater"] = "two-sided"
    correction: Literal["holm", "bh", "none"] = "holm"
    alpha: Alpha = 0.05


def resolve_config(preset: str | None, overrides: Mapping[str, Any]):
    """The one resolver of an arm's config: the preset's TrainConfig with the flat overrides applied
    (trainer.config checks each of them; ConfigError lists every problem)."""
    return apply_overrides(get_preset(preset), overrides)  # type: ignore[arg-type]


def _config_key(overrides: Mapping[str, Any]) -> str:
    """Identity of a set of flat overrides, for Spec's cache of resolved configs."""
    return json.dumps(overrides, sort_keys=True, default=repr)


class Spec(_Model):
    name: str
    description: str = ""
    trainer: TrainerSpec
    arms: dict[str, dict[str, Any]]
    baseline: str = "baseline"
    seeds: list[int] | SequentialSeeds
    resources: Resources = Resources()
    target_loss: float | None = None
    retries: int = 0
    analysis: Analysis = Analysis()
    data_root: str | None = None
    search: dict[str, Any] | None = None  # owned by the search (Optuna) work; passed through

    _source: str = PrivateAttr(default="<string>")
    _text: str = PrivateAttr(default="")
    # script arms (ablate.spec.script): the folder relative paths start from, each arm's resolved code, and
    # for a spec read back from the store (no files), each arm's identity from script_arms.json
    _base_dir: Path | None = PrivateAttr(default=None)
    _scripts: dict = PrivateAttr(default_factory=dict)
    _stored_scripts: dict | None = PrivateAttr(default=None)
    # each resolved TrainConfig by its overrides (_config_key): an arm is resolved once per spec
    _configs: dict = PrivateAttr(default_factory=dict)
    _search_cfg: Any = PrivateAttr(default=None)  # the parsed search block (validation parses it once)

    # ---- field checks (messages become "field=value: message; fix: example") -------------
    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_experiment(v):
            raise ValueError(f"must match {NAME_RULE} (it names the store folder)")
        return v

    @field_validator("arms", mode="before")
    @classmethod
    def _arms(cls, v: Any) -> Any:
        if v is None or (isinstance(v, Mapping) and not v):
            raise ValueError("no arms: an experiment needs at least one arm")
        if not isinstance(v, Mapping):
            raise ValueError("must be a mapping of arm name → overrides")
        out: dict[str, Any] = {}
        bad = [name for name in v if not is_arm(name)]
        if bad:  # every bad name in one message
            raise ValueError(f"arm name(s) {', '.join(map(repr, bad))} must be strings matching {ARM_RULE} (they "
                             "become part of run ids and file names); quote numbers")
        for name, ov in v.items():
            if ov is None:
                ov = {}
            if not isinstance(ov, Mapping):
                raise ValueError(f"arm {name!r} must map to overrides, e.g. `{name}: {{optim.muon.lr: 0.03}}`, "
                                 f"got {ov!r}")
            out[name] = dict(ov)
        return out

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a number of seeds, a list of seeds or {min, max, alpha}")
        if isinstance(v, int):
            if v < 1:
                raise ValueError("need at least 1 seed")
            if v > MAX_SEEDS:
                raise ValueError(f"at most {MAX_SEEDS} seeds per arm")
            return list(range(v))
        if isinstance(v, list):
            if not v:
                raise ValueError("empty seed list: need at least 1 seed")
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 or s > INT64_MAX for s in v):
                raise ValueError(f"seeds in a list must be integers in 0..{INT64_MAX} (int64, the store's seed type)")
            if len(v) > MAX_SEEDS:
                raise ValueError(f"at most {MAX_SEEDS} seeds per arm")
            if len(set(v)) != len(v):
                raise ValueError("seeds in a list must be unique")
            return v
        if isinstance(v, Mapping):
            try:
                seq = SequentialSeeds.model_validate(dict(v))
            except ValidationError as e:
                raise ValueError("; ".join(_pydantic_lines(e, "seeds"))) from None
            if seq.min > seq.max:
                raise ValueError(f"min ({seq.min}) must be ≤ max ({seq.max})")
            return seq
        raise ValueError("expected a number of seeds, a list of seeds or {min, max, alpha}")

    @field_validator("retries")
    @classmethod
    def _retries(cls, v: int) -> int:
        if not 0 <= v <= MAX_RETRIES:
            raise ValueError(f"must be in 0..{MAX_RETRIES}")
        return v

    @field_validator("target_loss")
    @classmethod
    def _target(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError("must be a positive number")
        return v

    # ---- derived views -------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self._source

    @property
    def text(self) -> str:
        """The YAML text the spec was loaded from (copied into the store)."""
        return self._text

    @property
    def arm_names(self) -> list[str]:
        return list(self.arms)

    @property
    def sequential(self) -> bool:
        return isinstance(self.seeds, SequentialSeeds)

    @property
    def trainer_label(self) -> str:
        """What the experiment runs, for one-line summaries: "preset tiny" or "script train_gpt.py"."""
        t = self.trainer
        if t.script is not None:
            return f"script {t.script}"
        mixed = sum(self.is_script_arm(a) for a in self.arms)
        return f"preset {t.preset}" + (f" (+ {mixed} script arm{'s' if mixed > 1 else ''})" if mixed else "")

    def is_script_arm(self, arm: str) -> bool:
        """Whether the arm runs a training script (ablate.spec.script) instead of the built-in trainer."""
        from ablate.spec.script import is_script_arm

        return is_script_arm(self, arm)

    @property
    def max_seeds(self) -> list[int]:
        """Every seed the experiment may run (0..max-1 for sequential seeds)."""
        return list(range(self.seeds.max)) if isinstance(self.seeds, SequentialSeeds) else list(self.seeds)

    def overrides(self, arm: str) -> dict[str, Any]:
        """Flat dotted overrides of an arm: trainer.set, then the arm, then the device for CPU runs."""
        if arm not in self.arms:
            raise SpecError(f"arm={arm!r} is not in the spec; arms are: {', '.join(self.arms)}")
        if self.is_script_arm(arm):  # script, patch, files, env, args as the spec writes them
            from ablate.spec.script import arm_overrides

            return arm_overrides(self, arm)
        out = {**flatten(self.trainer.set), **flatten(self.arms[arm])}
        if self.resources.gpus_per_run == 0:
            out["runtime.device"] = "cpu"
        return out

    def resolve(self, arm: str, overrides: Mapping[str, Any] | None = None):
        """The arm's TrainConfig (seed excluded); `overrides` replaces the arm's own. Resolved once
        per spec and overrides (validation already resolved every arm), then reused."""
        if self.is_script_arm(arm):
            raise SpecError(f"arm {arm!r} runs a script ({self.overrides(arm)['script']}): it has no trainer config")
        ov = self.overrides(arm) if overrides is None else dict(overrides)
        key = _config_key(ov)
        if key not in self._configs:
            self._configs[key] = resolve_config(self.trainer.preset, ov)
        return self._configs[key]

    def search_config(self):
        """The `search:` block as a SearchConfig (ablate.spec.search_space), checked against the
        trainer around the baseline's config: parsed once (validation keeps it), then reused."""
        if self.search is None:
            raise SpecError("the spec has no `search:` block; fix: add one (docs/search.md) or use `ablate run` "
                            "for a plain ablation", self._source)
        if self._search_cfg is None:  # a Spec built without parse_spec's checks
            from ablate.spec.search_space import parse_search

            try:
                self._search_cfg = parse_search(self.search, preset=self.trainer.preset,  # type: ignore[arg-type]
                                                base_overrides=self.overrides(self.baseline),
                                                base_config=self.resolve(self.baseline))
            except SpecError as e:
                raise SpecError(e.problems, self._source) from None
        return self._search_cfg

    def config_hash(self, arm: str, overrides: Mapping[str, Any] | None = None) -> str:
        """trainer.config.config_hash of the arm's config, with data.data_dir as the spec wrote it
        (not yet made absolute), so moving the checkout keeps results resumable."""
        from trainer.config import config_hash

        if self.is_script_arm(arm):  # sha256 of the patched script and its files, env, args
            from ablate.spec.script import arm_hash

            return arm_hash(self, arm)
        return config_hash(self.resolve(arm, overrides))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain YAML keeps the last one silently) and
    aliases (`*name`: a few hundred bytes of nested aliases expand into gigabytes)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError(f"YAML alias *{event.anchor} on line {event.start_mark.line + 1} is not allowed in a spec "
                            "(aliases can expand a small file into gigabytes); fix: write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if not any(k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: let the base class report it
                    continue
                if first is not None:
                    raise SpecError(
                        f"duplicate key {key!r} on line {line} (first on line {first}): YAML would keep "
                        "only the last one and silently drop an arm or a setting; fix: rename or remove one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path) -> Spec:
    """Read, parse and validate a spec file; SpecError (exit code 2) on any problem. Relative
    script paths (script arms) are taken from the file's folder."""
    src = str(path)
    try:
        with open(path, "rb") as f:  # at most MAX_SPEC_BYTES + 1: /dev/zero or a huge file is refused
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"spec file {src!r} cannot be read: {e.strerror or e}; fix: check the path "
                        "(relative paths are taken from the current directory)") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"spec file {src!r} is larger than {MAX_SPEC_BYTES // 1024} KiB: not an experiment spec "
                        "(they are a few KB); fix: check the path")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"spec file {src!r} is not UTF-8 text; fix: save it as UTF-8 YAML") from None
    return parse_spec_text(text, source=src, base_dir=Path(path).resolve().parent)


def parse_spec_text(text: str, source: str = "<string>", *, base_dir: Path | None = None,
                    stored_scripts: Mapping[str, Any] | None = None) -> Spec:
    spec = parse_spec(_load_yaml(text, source), source, base_dir=base_dir, stored_scripts=stored_scripts)
    spec._text = text
    return spec


def _load_yaml(text: str, source: str) -> Any:
    """The YAML of a spec (bounded, no aliases, no duplicate keys); SpecError naming line and fix."""
    if len(text.encode("utf-8", errors="replace")) > MAX_SPEC_BYTES:
        raise SpecError(f"the spec is larger than {MAX_SPEC_BYTES // 1024} KiB: not an experiment spec", source)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except SpecError as e:
        raise SpecError(e.problems, source) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"not valid YAML{where}: {problem}; fix: check indentation and quoting there",
                        source) from None
    except RecursionError:
        raise SpecError("the YAML nests too deeply to be a spec; fix: check the file", source) from None
    return data


def parse_spec(data: Any, source: str = "<dict>", *, base_dir: Path | None = None,
               stored_scripts: Mapping[str, Any] | None = None) -> Spec:
    """Validate a spec mapping; collects every problem into one SpecError. Script arms: relative
    paths start at `base_dir` (default: the current directory); `stored_scripts` (a spec read back
    from the store: its script_arms.json) gives each script arm's identity without the files."""
    if not isinstance(data, Mapping):
        raise SpecError(f"the spec must be a YAML mapping (name:, trainer:, arms:, seeds:, ...), got "
                        f"{type(data).__name__}; fix: start from experiments/smoke.yaml", source)
    problems, known = _unknown_keys(data, Spec, "")
    problems += _non_finite(known)
    try:  # the rest is checked without the unknown keys, so every problem is reported at once
        spec = Spec.model_validate(known)
    except ValidationError as e:
        # the schema failed; the overrides and the search space are still checked, from the raw values
        raise SpecError(problems + _pydantic_lines(e, "") + _raw_problems(known, e), source) from None
    spec._base_dir = base_dir
    spec._stored_scripts = dict(stored_scripts) if stored_scripts is not None else None
    problems += _semantic_problems(spec)
    if problems:
        raise SpecError(problems, source)
    spec._source = source
    return spec


def _non_finite(data: Any, path: str = "") -> list[str]:
    """Every NaN or infinite number in trainer.set, the arms and the search block (the typed
    fields refuse them themselves: allow_inf_nan=False)."""
    out: list[str] = []
    if isinstance(data, Mapping):
        for k, v in data.items():
            if not path and k not in ("trainer", "arms", "search"):
                continue
            out += _non_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            out += _non_finite(v, f"{path}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        out.append(f"{path}={data!r}: not a finite number (.nan/.inf are never a valid setting); fix: a number, "
                   "e.g. 0.03")
    return out


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return []


def _unknown_keys(data: Mapping[str, Any], model: type[BaseModel], prefix: str) -> tuple[list[str], dict]:
    """Unknown keys at any level of the spec's own structure (with close matches), and the data
    without them."""
    problems: list[str] = []
    known: dict[str, Any] = {}
    fields = model.model_fields
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            where = f"in {prefix[:-1]}" if prefix else "at the top level"
            problems.append(f"unknown key {path!r} {where}; {hint}valid keys: {', '.join(fields)}")
            continue
        sub = _models_in(fields[key].annotation)
        if sub and isinstance(value, Mapping):
            more, value = _unknown_keys(value, sub[0], f"{path}.")
            problems += more
        known[key] = value
    return problems, known


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[int]", "SequentialSeeds", "function-before[_seeds(), union[list[int],SequentialSeeds]]"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _pydantic_lines(err: ValidationError, prefix: str) -> list[str]:
    lines = []
    for e in err.errors():
        loc = _loc(e["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        fix = EXAMPLES.get(path) or EXAMPLES.get(path.split(".")[0], "")
        fix = f"; fix: {fix}" if fix else ""
        if e["type"] == "missing":
            lines.append(f"{path}: missing (required){fix}")
            continue
        msg = str(e["msg"]).removeprefix("Value error, ")
        value = repr(e["input"])
        if len(value) > 120:  # a long mapping: the message names what is wrong in it
            lines.append(f"{path}: {msg}{fix}")
        else:
            lines.append(f"{path}={value}: {msg}{fix}")
    return lines


def _semantic_problems(spec: Spec) -> list[str]:
    """Cross-field checks and the trainer's own check of every override and of the search space."""
    problems: list[str] = []
    if spec.baseline not in spec.arms:
        problems.append(f"baseline={spec.baseline!r} is not an arm (arms: {', '.join(spec.arms)}); fix: add "
                        f"`{spec.baseline}: {{}}` under arms, or set `baseline:` to one of the arms")
    n_runs = len(spec.arms) * len(spec.max_seeds)
    if n_runs > MAX_RUNS:
        problems.append(f"arms × seeds = {len(spec.arms)} × {len(spec.max_seeds)} = {n_runs} runs, more than "
                        f"{MAX_RUNS}; fix: fewer arms or seeds (or split the experiment)")
    from ablate.spec.script import script_problems, uses_scripts

    if uses_scripts(spec):  # script experiments and script arms: ablate/spec/script.py
        problems += script_problems(spec)
        if spec.trainer.script is not None or spec.trainer.preset is None:
            return problems
    preset_arms = {a: ov for a, ov in spec.arms.items() if not spec.is_script_arm(a)}
    searches: dict[str, Any] = {}
    problems += _override_problems(spec.trainer.preset, spec.trainer.set, preset_arms, spec.resources,
                                   spec.baseline, spec.search, configs=spec._configs, searches=searches)
    spec._search_cfg = searches.get("search")
    return problems


def _raw_problems(data: Mapping[str, Any], err: ValidationError) -> list[str]:
    """After a schema error: the override and search-space checks that the raw values still allow."""
    failed = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
    trainer = data.get("trainer")
    if "trainer" in failed or not isinstance(trainer, Mapping) or not isinstance(trainer.get("preset"), str):
        return []
    tset = trainer.get("set") or {}
    arms = data.get("arms")
    arms = {a: (o or {}) for a, o in arms.items() if is_arm(a) and isinstance(o or {}, Mapping)} \
        if isinstance(arms, Mapping) else {}
    from ablate.spec.script import ARM_KEYS

    arms = {a: o for a, o in arms.items() if not any(k in o for k in ARM_KEYS)}  # script arms take no overrides
    try:
        resources = Resources.model_validate(data.get("resources", {})) if "resources" not in failed else None
    except ValidationError:
        resources = None
    baseline = data.get("baseline")
    search = data.get("search") if "search" not in failed else None
    return _override_problems(trainer["preset"], tset if isinstance(tset, Mapping) else {}, arms, resources,
                              baseline if isinstance(baseline, str) else Spec.model_fields["baseline"].default,
                              search)


def _override_problems(preset: str, tset: Mapping[str, Any], arms: Mapping[str, Mapping[str, Any]],
                       r: Resources | None, baseline: str, search: Any, configs: dict | None = None,
                       searches: dict | None = None) -> list[str]:
    """Reserved keys, the compile-cache clash, every override against the trainer's config tree
    (each arm checked even when another fails), world-size divisibility and the search space.
    Each arm is resolved once, as Spec.resolve would (`configs`: where those configs are kept); the
    parsed search block goes to `searches["search"]`."""
    from trainer.config import ConfigError

    problems: list[str] = []
    try:
        preset_cfg = apply_overrides(get_preset(preset), {})
    except ConfigError as e:
        return [f"trainer.preset: {e}; fix: {EXAMPLES['trainer.preset']}"]
    cpu = {"runtime.device": "cpu"} if r is not None and r.gpus_per_run == 0 else {}
    checked: dict[str, dict[str, Any]] = {}  # where → its overrides without the reserved keys
    for where, ov in [("trainer.set", tset)] + [(f"arms.{a}", o) for a, o in arms.items()]:
        flat = flatten(ov)
        for key in flat:
            if key in RESERVED_KEYS:
                problems.append(f"{where}: {key!r} cannot be overridden here; fix: use `{RESERVED_KEYS[key]}`")
            if key == CACHE_KEY and r is not None and r.compile_cache_dir:
                problems.append(f"{where}: {CACHE_KEY!r} and resources.compile_cache_dir="
                                f"{r.compile_cache_dir!r} both set the compile cache; fix: keep only "
                                "resources.compile_cache_dir")
        checked[where] = {k: v for k, v in flat.items() if k not in RESERVED_KEYS}
    base_ok = True
    try:
        apply_overrides(preset_cfg, checked["trainer.set"])
    except ConfigError as e:
        problems += [f"trainer.set: {line}" for line in str(e).splitlines()]
        base_ok = False  # the arms are still checked, against the preset alone
    indivisible: dict[int, list[str]] = {}  # reference_world_size → arms
    arm_ok: dict[str, bool] = {}
    for arm in arms:  # on the preset with trainer.set (the preset alone when trainer.set failed)
        ov = {**(checked["trainer.set"] if base_ok else {}), **checked[f"arms.{arm}"], **cpu}
        try:
            cfg = resolve_config(preset, ov)
        except ConfigError as e:
            problems += [f"arms.{arm}: {line}" for line in str(e).splitlines()]
            arm_ok[arm] = False
            continue
        arm_ok[arm] = True
        if configs is not None and base_ok:
            configs[_config_key(ov)] = cfg
        if r is not None and cfg.runtime.reference_world_size % r.ranks:
            indivisible.setdefault(cfg.runtime.reference_world_size, []).append(arm)
        if r is not None and r.gpus_per_run == 0 and flatten(arms[arm]).get("runtime.device") == "cuda":
            problems.append(f"arms.{arm}: runtime.device='cuda' with resources.gpus_per_run=0; fix: give the run "
                            "GPUs or drop the device override")
    if search is not None:
        from ablate.spec.search_space import SearchSpaceError, parse_search

        clash = [a for a in arms if re.fullmatch(r"t\d+", a)]
        if clash:
            problems.append(f"arms {', '.join(clash)}: names t<number> are the search's suggestions in a search "
                            "spec; fix: rename those arms")
        if base_ok and arm_ok.get(baseline, baseline not in arms):  # a valid base to search around
            base_ov = {**checked["trainer.set"], **checked.get(f"arms.{baseline}", {}), **cpu}
            try:
                parsed = parse_search(search, preset=preset, base_overrides=base_ov,
                                      base_config=(configs or {}).get(_config_key(base_ov)))
            except SearchSpaceError as e:
                problems += e.problems
            else:
                if searches is not None:
                    searches["search"] = parsed
    for ref, names in indivisible.items():
        field = "resources.gpus_per_run" if r.gpus_per_run else "resources.cpu_ranks_per_run"  # type: ignore[union-attr]
        ranks = r.ranks  # type: ignore[union-attr]
        ok = [d for d in RANK_CHOICES if ref % d == 0]
        problems.append(f"{field}={ranks}: {ranks} ranks do not divide runtime.reference_world_size={ref} "
                        f"(arms: {', '.join(names)}; grad accumulation = reference/ranks); fix: use one of "
                        f"{', '.join(map(str, ok))}, or set runtime.reference_world_size: {ranks} in trainer.set")
    return problems


# --------------------------------------------------------------------------------------------
# The copy in the store
# --------------------------------------------------------------------------------------------
# What the analysis (table, report.md) reads from a spec. A stored copy that no longer validates
# as a whole (an old store; a trainer key renamed since) still gives these, each validated by the
# model, with the model's defaults for those that are absent or invalid.
ANALYSIS_FIELDS = ("description", "trainer", "baseline", "seeds", "target_loss", "analysis", "search")


@dataclass(frozen=True)
class StoredSpec:
    """An experiment's spec.yaml copy read back from the store, parsed once by the model.

    `spec`: the whole spec (None when there is no copy or it no longer validates). `analysis`:
    what the table and the report read: `spec`, else a Spec holding only the copy's
    ANALYSIS_FIELDS that still validate (`kept`; its name, arms and other fields are
    placeholders, not the experiment's). `problem`: why a copy did not validate."""

    spec: Spec | None
    analysis: Spec
    source: str
    problem: str | None = None
    kept: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # analysis fields of the copy that are invalid (defaults used)

    @property
    def exists(self) -> bool:
        return self.spec is not None or self.problem is not None

    def note(self) -> str | None:
        """For `ablate table`/`report` when the copy no longer validates: what is used, and the fix."""
        if self.problem is None:
            return None
        used = f"only its {', '.join(self.kept)}" if self.kept else "none of its fields"
        bad = f" (invalid, so the defaults instead: {', '.join(self.dropped)})" if self.dropped else ""
        return (f"{self.source} no longer validates ({self.problem}); the table uses {used}{bad}; "
                "fix: run the experiment's current spec (`ablate run SPEC` stores its copy), or pass "
                "--baseline/--target")


def analysis_spec(data: Any, name: str = "defaults") -> tuple[Spec, tuple[str, ...], tuple[str, ...]]:
    """A Spec of the ANALYSIS_FIELDS of `data` that validate (unknown keys in them ignored; `{}`:
    the model's defaults), the fields kept and the ones dropped. The required fields without a
    default (name, trainer, arms, seeds) are placeholders where `data` does not give them."""
    _, known = _unknown_keys(data if isinstance(data, Mapping) else {}, Spec, "")
    fields = {k: known[k] for k in ANALYSIS_FIELDS if k in known}
    placeholders = {"name": name if is_experiment(name) else "stored", "trainer": {}, "arms": {"stored": {}},
                    "seeds": 1}
    dropped: list[str] = []
    while True:
        try:
            spec = Spec.model_validate({**placeholders, **fields})
        except ValidationError as e:
            bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]} & set(fields)
            if not bad:  # only the placeholders could fail, and they are valid
                raise
            dropped += sorted(bad)
            fields = {k: v for k, v in fields.items() if k not in bad}
            continue
        return spec, tuple(fields), tuple(dropped)


def parse_stored_spec(text: str | None, experiment: str, source: str, *,
                      stored_scripts: Mapping[str, Any] | None = None) -> StoredSpec:
    """A spec copy from the store (None: there is none), parsed once; see StoredSpec."""
    if text is None:
        return StoredSpec(None, analysis_spec({}, experiment)[0], source)
    try:
        spec = parse_spec_text(text, source=source, stored_scripts=stored_scripts)
        return StoredSpec(spec, spec, source)
    except SpecError as e:
        problem = e.problems[0] if len(e.problems) == 1 else f"{len(e.problems)} problems, the first: {e.problems[0]}"
    try:
        data = _load_yaml(text, source)
    except SpecError:  # not even YAML: the model's defaults
        data = {}
    analysis, kept, dropped = analysis_spec(data, experiment)
    return StoredSpec(None, analysis, source, problem, kept, dropped)


def read_stored_spec(store: Any, experiment: str) -> StoredSpec:
    """The experiment's spec.yaml in the store, parsed once by the model; script arms get their
    identity at the last run (script_arms.json), not today's files."""
    raw = store.read_bytes(experiment, "spec.yaml", max_bytes=2 * MAX_SPEC_BYTES)
    source = store.display_path(experiment, "spec.yaml")
    if raw is None:
        return parse_stored_spec(None, experiment, source)
    return parse_stored_spec(raw.decode("utf-8", errors="replace"), experiment, source,
                             stored_scripts=read_stored(store, experiment))


def data_root_path(data_root: str | None, project_root: Path) -> Path:
    """Where a relative data.data_dir is rooted: `data_root` (relative → under the project root)."""
    if not data_root:
        return project_root
    p = Path(data_root).expanduser()
    return p if p.is_absolute() else project_root / p


flatten = _trainer_flatten  # nested override mapping → flat dotted keys (one implementation)

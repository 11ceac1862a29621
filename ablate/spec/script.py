"""Script arms: your own torchrun training script (a fork of the record's train_gpt.py) as an arm.

    ablate validate premul-o.yaml          # script exists, patches apply, env values are strings, ...

    name: premul-o
    trainer: {script: records/2025-12-11/train_gpt.py, nproc_per_node: 8}
    arms:
      baseline: {}
      premul-o: {script: my/train_gpt.py}
      no-smear: {patch: my/no_smear.diff}     # a unified diff applied to the base script
      wd-0.02: {env: {MUON_WD: "0.02"}}      # environment, for a script that reads it
    seeds: 8
    resources: {gpus_per_run: 8}

This module owns the spec side (docs/spec.md, "Scripts"): which arms run a script, the checks made
before anything runs, patching, and each arm's identity. ablate.run.script_trial launches such arms.
Relative `script`, `patch` and `files` paths are taken from the spec file's folder. An arm's code
is its script after its patches, plus `files:` (more files the script reads or imports, placed
beside it in each run's working directory); its config hash is that code's sha256 digests with
`env` and `args`, so a rerun skips finished (arm, seed) pairs and an edited script or patch runs
again. `ablate run` keeps each arm's identity in the store (script_arms.json), so tables and
`ablate status` know the current config of each arm without the files.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping

from ablate.spec.patch import PatchError, apply_file_patch, parse_patch

if TYPE_CHECKING:
    from ablate.spec.model import Spec

ARM_KEYS = ("script", "patch", "files", "env", "args")  # what a script arm may set
TRAINER_SCRIPT_FIELDS = ("script", "files", "nproc_per_node", "env", "args", "obtain")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by torchrun or ablate for every run (docs/spec.md); the data path comes from `data_root`.
RESERVED_ENV = {
    "SEED": "ablate sets it to the run's seed (from `seeds:`)",
    "DATA_PATH": "ablate sets it to the run's folder, whose data/ links to `data_root:`",
    "CUDA_VISIBLE_DEVICES": "Ray assigns the run's GPUs",
    "OMP_NUM_THREADS": "set from resources.cpus_per_run",
    **{k: "torchrun sets it" for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                       "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")},
}
RESERVED_PREFIXES = ("ABLATE_", "TORCHELASTIC_")
CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")  # from resources.compile_cache_dir
STORED_ARMS = "script_arms.json"  # per experiment: the identity of each script arm at the last run
MAX_CODE_BYTES = 16 << 20  # a script, patch or file larger than this is refused (each run carries its code)


@dataclass(frozen=True)
class CodeFile:
    """One file of an arm's code: where it goes in the run's folder, where it was read, its text."""

    name: str  # path in the run's working directory, e.g. "train_gpt.py", "triton_kernels.py"
    path: str  # absolute path it was read from (on the driver)
    text: str  # after the arm's patches
    sha256: str


@dataclass(frozen=True)
class ScriptArm:
    """What one script arm runs: the resolved, patched code and its environment and arguments."""

    arm: str
    script: CodeFile
    files: tuple[CodeFile, ...]
    patches: tuple[tuple[str, str], ...]  # (path as written, sha256 of the diff)
    env: dict[str, str]
    args: tuple[str, ...]
    overrides: dict[str, Any]  # the arm's fields as the spec writes them (merged with trainer's)

    @property
    def config_hash(self) -> str:
        return identity_hash(self.script.sha256, {f.name: f.sha256 for f in self.files}, self.env, self.args)

    def config(self) -> dict[str, Any]:
        """What ran, for the row's config_json (with the log's facts added by the run)."""
        return {"script": {"name": self.script.name, "path": self.script.path, "sha256": self.script.sha256,
                           "files": {f.name: f.sha256 for f in self.files},
                           "patches": [{"path": p, "sha256": h} for p, h in self.patches],
                           "env": self.env, "args": list(self.args)}}

    def record(self) -> dict[str, Any]:
        """This arm's entry of script_arms.json."""
        return {"config_hash": self.config_hash, "script_sha256": self.script.sha256, "overrides": self.overrides}


def identity_hash(script_sha256: str, files: Mapping[str, str], env: Mapping[str, str], args: Any) -> str:
    """The config hash of a script arm: (script sha256 after patching, files, env, args); the seed
    is the other half of a run's identity."""
    blob = json.dumps({"script": script_sha256, "files": dict(files), "env": dict(env), "args": list(args)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Which arms run a script
# --------------------------------------------------------------------------------------------
def is_script_arm(spec: "Spec", arm: str) -> bool:
    """In a script experiment (trainer.script) every arm; in a preset experiment an arm that sets
    any of script/patch/files/env/args."""
    fields = spec.arms.get(arm)
    if fields is None:
        return False
    return spec.trainer.script is not None or any(k in fields for k in ARM_KEYS)


def uses_scripts(spec: "Spec") -> bool:
    t = spec.trainer
    return (t.preset is None or t.script is not None or any(is_script_arm(spec, a) for a in spec.arms)
            or any(getattr(t, f) for f in TRAINER_SCRIPT_FIELDS) or t.allow_mixed)


def resolved(spec: "Spec", arm: str) -> ScriptArm:
    """The arm's resolved code (read and patched when the spec was validated)."""
    try:
        return spec._scripts[arm]
    except KeyError:
        from ablate.errors import SpecError

        raise SpecError(f"arm {arm!r} has no resolved script: the spec was read from the store "
                        f"({spec.source}), without the script files; fix: run it from the spec file") from None


def arm_overrides(spec: "Spec", arm: str) -> dict[str, Any]:
    if spec._stored_scripts is not None:
        return dict(spec._stored_scripts[arm]["overrides"])
    return dict(resolved(spec, arm).overrides)


def arm_hash(spec: "Spec", arm: str) -> str:
    if spec._stored_scripts is not None:
        return str(spec._stored_scripts[arm]["config_hash"])
    return resolved(spec, arm).config_hash


# --------------------------------------------------------------------------------------------
# Checks (called by ablate.spec.model before anything runs)
# --------------------------------------------------------------------------------------------
def script_problems(spec: "Spec") -> list[str]:
    """Every problem of the spec's script side, one line each (field, value, fix). Fills
    spec._scripts with each script arm's resolved code."""
    t, problems = spec.trainer, []
    if t.preset is not None and t.script is not None:
        return [f"trainer: preset={t.preset!r} and script={t.script!r} are both set; an experiment runs the "
                "built-in trainer (preset) or your script; fix: keep one (a script arm in a preset experiment "
                "names its script in the arm, with trainer.allow_mixed: true)"]
    if t.preset is None and t.script is None:
        return ["trainer: needs `preset:` (the built-in trainer) or `script:` (your train_gpt.py); fix: trainer: "
                "{preset: speedrun} or trainer: {script: train_gpt.py, nproc_per_node: 8}"]
    if t.script is not None:
        if t.set:
            problems.append(f"trainer.set={t.set!r}: overrides of the built-in trainer's config, but trainer.script "
                            "runs your script; fix: pass settings as `env:` or `args:`, or as a `patch:`")
        if t.allow_mixed:
            problems.append("trainer.allow_mixed: only for a preset experiment with script arms; every arm of a "
                            "script experiment runs a script; fix: drop it")
        if t.nproc_per_node is not None and t.nproc_per_node != spec.resources.ranks:
            field = "gpus_per_run" if spec.resources.gpus_per_run else "cpu_ranks_per_run"
            problems.append(f"trainer.nproc_per_node={t.nproc_per_node} but resources.{field} gives "
                            f"{spec.resources.ranks} rank(s) per run; torchrun starts one rank per GPU; fix: "
                            f"resources: {{gpus_per_run: {t.nproc_per_node}}} (or drop nproc_per_node)")
    else:
        for f in TRAINER_SCRIPT_FIELDS:
            if getattr(spec.trainer, f):
                problems.append(f"trainer.{f}: only for script experiments (trainer.script); in a preset "
                                f"experiment give `{f}` in the script arm itself")
    if spec.resources.reuse_workers:
        problems.append("resources.reuse_workers=True: a script runs as a fresh torchrun per run (it cannot be "
                        "handed another run); fix: drop reuse_workers from this experiment")
    if spec.search is not None:
        problems.append("search: an Optuna search suggests overrides of the built-in trainer; it cannot drive "
                        "a script; fix: drop `search:` or use trainer.preset")
    script_arms = [a for a in spec.arms if is_script_arm(spec, a)]
    if t.preset is not None and script_arms and not t.allow_mixed:
        problems.append(f"arms {', '.join(script_arms)}: script arms in a preset experiment (trainer.preset="
                        f"{t.preset!r}) would be compared with runs of the built-in trainer, another program; fix: "
                        "set trainer.allow_mixed: true to compare them anyway, or give the script its own "
                        "experiment (trainer: {script: ...})")
    trainer_bad = _field_problems("trainer", {"env": t.env, "args": t.args, "files": t.files},
                                  spec.resources.compile_cache_dir)
    problems += trainer_bad
    for arm in script_arms:
        fields = spec.arms[arm]
        unknown = [k for k in fields if k not in ARM_KEYS]
        for k in unknown:
            close = difflib.get_close_matches(str(k), ARM_KEYS, n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            problems.append(f"arms.{arm}: {k!r} is not a field of a script arm ({', '.join(ARM_KEYS)}); {hint}"
                            "a script takes no trainer overrides; fix: pass the value as env: {NAME: \"value\"} "
                            "or args: [...] and read it in the script, or change the script with a patch:")
        if t.script is None and "script" not in fields:
            problems.append(f"arms.{arm}: {', '.join(k for k in fields if k in ARM_KEYS)} need(s) a script, but "
                            f"this is a preset experiment (trainer.preset={t.preset!r}); fix: name the script "
                            "in the arm (script: path/train_gpt.py) or make trainer.script the base script")
            continue
        more = _field_problems(f"arms.{arm}", fields, spec.resources.compile_cache_dir)
        if unknown or more or trainer_bad:  # resolve only well-formed arms
            problems += more
            continue
        if spec._stored_scripts is not None:
            rec = spec._stored_scripts.get(arm)
            if not (isinstance(rec, dict) and isinstance(rec.get("config_hash"), str)
                    and isinstance(rec.get("overrides"), dict)):
                problems.append(f"arms.{arm}: no valid record in the store's {STORED_ARMS}; fix: run the spec file "
                                "again (ablate run writes it)")
            continue
        try:
            spec._scripts[arm] = _resolve(spec, arm)
        except _ArmError as e:
            problems.append(str(e))
    return list(dict.fromkeys(problems))  # a missing base script is one problem, not one per arm


class _ArmError(Exception):
    pass


def _field_problems(where: str, fields: Mapping[str, Any], cache_dir: str) -> list[str]:
    """Types and names of script, patch, files, env and args."""
    out = []
    script = fields.get("script")
    if "script" in fields and (not isinstance(script, str) or not script.strip()):
        out.append(f"{where}.script={script!r}: expected a path to a training script; fix: script: train_gpt.py")
    for key in ("patch", "files"):
        v = fields.get(key)
        if v is None:
            continue
        items = [v] if key == "patch" and isinstance(v, str) else v
        if not isinstance(items, list) or any(not isinstance(p, str) or not p.strip() for p in items):
            out.append(f"{where}.{key}={v!r}: expected a path or a list of paths; fix: {key}: "
                       + ("my/change.diff" if key == "patch" else "[triton_kernels.py]"))
    env = fields.get("env")
    if env is not None:
        if not isinstance(env, Mapping):
            out.append(f"{where}.env={env!r}: expected a mapping NAME: \"value\"; fix: env: {{MUON_WD: \"0.02\"}}")
        else:
            for k, v in env.items():
                if not isinstance(k, str) or not ENV_NAME.match(k):
                    out.append(f"{where}.env: name {k!r} is not an environment variable name "
                               "([A-Za-z_][A-Za-z0-9_]*)")
                elif k in RESERVED_ENV or k.startswith(RESERVED_PREFIXES):
                    why = RESERVED_ENV.get(k, "ablate and torchrun use these names")
                    out.append(f"{where}.env.{k}: cannot be set here ({why})")
                elif k in CACHE_ENV and cache_dir:
                    out.append(f"{where}.env.{k} and resources.compile_cache_dir={cache_dir!r} both set the compile "
                               "cache; fix: keep only resources.compile_cache_dir")
                elif not isinstance(v, str):
                    out.append(f"{where}.env.{k}={v!r} ({type(v).__name__}): environment values are strings; fix: "
                               f"quote it: {k}: \"{_yaml_scalar(v)}\"")
                elif "\x00" in v:
                    out.append(f"{where}.env.{k}: contains a NUL character")
    args = fields.get("args")
    if args is not None:
        if not isinstance(args, list):
            out.append(f"{where}.args={args!r}: expected a list of strings; fix: args: [\"--lr\", \"0.03\"]")
        else:
            for i, a in enumerate(args):
                if not isinstance(a, str):
                    out.append(f"{where}.args[{i}]={a!r} ({type(a).__name__}): arguments are strings; fix: quote "
                               f"it: \"{_yaml_scalar(a)}\"")
    return out


def _yaml_scalar(v: Any) -> str:
    return {True: "true", False: "false", None: ""}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


# --------------------------------------------------------------------------------------------
# Resolving an arm: read, patch, hash
# --------------------------------------------------------------------------------------------
def _path(spec: "Spec", p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (spec._base_dir or Path.cwd()) / q


def _read(path: Path, what: str, hint: str = "") -> str:
    if not path.exists():
        raise _ArmError(f"{what}: no such file ({path}); {hint or 'fix: check the path (relative paths are taken '}"
                        + ("" if hint else "from the spec file's folder)"))
    if not path.is_file():
        raise _ArmError(f"{what}: {path} is not a file")
    try:
        size = path.stat().st_size
        if size > MAX_CODE_BYTES:
            raise _ArmError(f"{what}: {path} is {size / 2**20:.1f} MiB; scripts, patches and files up to "
                            f"{MAX_CODE_BYTES >> 20} MiB are supported (each run carries its code); fix: check the path")
        data = path.read_bytes()
    except OSError as e:
        raise _ArmError(f"{what}: cannot read {path}: {e.strerror or e}; fix: check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _ArmError(f"{what}: {path} is not UTF-8 text (byte {e.start})") from None


def _resolve(spec: "Spec", arm: str) -> ScriptArm:
    t, fields = spec.trainer, spec.arms[arm]
    own = "script" in fields
    where = f"arms.{arm}.script" if own else "trainer.script"
    written = fields["script"] if own else t.script
    spath = _path(spec, written).resolve()
    hint = ""
    if not own and t.obtain:
        hint = f"fix: obtain it first: {t.obtain.strip()} (trainer.obtain)"
    elif not own:
        hint = "fix: check trainer.script (relative paths are taken from the spec file's folder)"
    text = _read(spath, f"{where}={written!r}", hint)
    root = spath.parent
    # files: the trainer's, then the arm's (an arm's file replaces the trainer's of the same name)
    files: dict[str, CodeFile] = {}
    listed = [("trainer.files", p) for p in t.files] + [(f"arms.{arm}.files", p) for p in fields.get("files") or []]
    for fwhere, p in listed:
        fpath = _path(spec, p).resolve()
        try:
            name = str(PurePosixPath(fpath.relative_to(root).as_posix()))
        except ValueError:
            raise _ArmError(f"{fwhere}: {p!r} ({fpath}) is not in the script's folder {root}; each run's working "
                            "directory holds the script and its files at their places relative to it; fix: put "
                            "the file beside the script (or in a folder under it)") from None
        if name == spath.name:
            raise _ArmError(f"{fwhere}: {p!r} is the script itself")
        if name.split("/")[0] == "data":
            raise _ArmError(f"{fwhere}: {p!r}: data/ in a run's folder is the link to `data_root:`; fix: move the "
                            "file out of data/ or set data_root")
        files[name] = CodeFile(name, str(fpath), _read(fpath, f"{fwhere}: {p!r}"), "")
    texts = {spath.name: text, **{n: f.text for n, f in files.items()}}
    patches = fields.get("patch") or []
    patches = [patches] if isinstance(patches, str) else list(patches)
    applied: list[tuple[str, str]] = []
    for p in patches:
        ppath = _path(spec, p).resolve()
        ptext = _read(ppath, f"arms.{arm}.patch: {p!r}")
        try:
            for fp in parse_patch(ptext, source=f"arms.{arm}.patch: {p}"):
                hits = [n for n in texts if fp.matches(n)]
                if len(hits) != 1:
                    names = ", ".join(texts)
                    why = "names none of" if not hits else "matches several of"
                    raise PatchError(f"arms.{arm}.patch: {p}: the diff of {fp.path!r} {why} the arm's files ({names}); "
                                     "fix: diff the script (git diff -- train_gpt.py), or list the file in `files:`")
                texts[hits[0]] = apply_file_patch(texts[hits[0]], fp, source=f"arms.{arm}.patch: {p}",
                                                  target=hits[0])
        except PatchError as e:
            raise _ArmError(str(e)) from None
        applied.append((p, sha256_text(ptext)))
    script = CodeFile(spath.name, str(spath), texts[spath.name], sha256_text(texts[spath.name]))
    code = tuple(CodeFile(n, f.path, texts[n], sha256_text(texts[n])) for n, f in sorted(files.items()))
    _check_python(arm, script, code, root, where, text if patches else None)
    env = {**t.env, **(fields.get("env") or {})}
    args = tuple(t.args) + tuple(fields.get("args") or ())
    overrides: dict[str, Any] = {"script": written}
    if patches:
        overrides["patch"] = patches
    if files:
        overrides["files"] = [f.path for f in code]
    if env:
        overrides["env"] = env
    if args:
        overrides["args"] = list(args)
    return ScriptArm(arm, script, code, tuple(applied), env, args, overrides)


def _parses(text: str, name: str) -> bool:
    try:
        ast.parse(text, filename=name)
        return True
    except (SyntaxError, ValueError):
        return False


def _check_python(arm: str, script: CodeFile, files: tuple[CodeFile, ...], root: Path, where: str,
                  unpatched: str | None) -> None:
    """Patches must not break a .py script that parsed, and a module the script imports from its
    own folder must be in `files:` (each run's folder holds only the script and its files). A script
    this Python cannot parse (e.g. syntax of a newer Python than the driver's) is not judged."""
    if not script.name.endswith(".py"):
        return
    try:
        tree = ast.parse(script.text, filename=script.name)
    except (SyntaxError, ValueError) as e:
        if unpatched is not None and _parses(unpatched, script.name):
            raise _ArmError(f"arms.{arm}: the script after its patches is not valid Python ({script.name}, line "
                            f"{getattr(e, 'lineno', '?')}: {getattr(e, 'msg', e)}), though it was before them; fix: "
                            "check the patch") from None
        return
    have = {f.name for f in files}
    missing = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            top = name.split(".")[0]
            local = f"{top}.py" if (root / f"{top}.py").is_file() else None
            if local is None and (root / top / "__init__.py").is_file():
                local = f"{top}/__init__.py"
            if local and local not in have and not any(h.startswith(f"{top}/") for h in have) and local not in missing:
                missing.append(local)
    if missing:
        raise _ArmError(f"{where}: the script imports {', '.join(m.split('/')[0].removesuffix('.py') for m in missing)} "
                        f"from its own folder ({root}), but each run's working directory holds only the script "
                        f"and `files:`; fix: files: [{', '.join(missing)}] (in trainer, or in the arm)")


def describe(spec: "Spec") -> list[str]:
    """Lines for `ablate run --dry-run`: how a script arm runs, and each arm's code."""
    arms = [a for a in spec.arms if is_script_arm(spec, a)]
    if not arms or spec._stored_scripts is not None:
        return []
    data = spec.data_root or "<project root>/data"
    out = [f"script arms: each run is `torchrun --standalone --nproc_per_node={spec.resources.ranks} SCRIPT ARGS` in "
           f"a working directory of its own (DATA_PATH) holding the arm's code and data/ → {data} (on the run's "
           "node), with SEED=<seed> and the arm's env"]
    for arm in arms:
        sa = resolved(spec, arm)
        extra = [f"{len(sa.patches)} patch(es)"] * bool(sa.patches) + [f"{len(sa.files)} file(s)"] * bool(sa.files)
        extra += [f"env {' '.join(f'{k}={v}' for k, v in sa.env.items())}"] * bool(sa.env)
        extra += [f"args {' '.join(sa.args)}"] * bool(sa.args)
        out.append(f"  {arm}: {sa.script.path} → sha256 {sa.script.sha256[:16]}…"
                   + (f" ({'; '.join(extra)})" if extra else ""))
    return out


# --------------------------------------------------------------------------------------------
# The store side: each arm's identity at the last run (tables, status)
# --------------------------------------------------------------------------------------------
def stored_records(spec: "Spec") -> dict[str, dict]:
    return {arm: resolved(spec, arm).record() for arm in spec.arms if is_script_arm(spec, arm)}


def store_arms(store: Any, spec: "Spec") -> None:
    """Write script_arms.json next to spec.yaml (ablate run), for a spec with script arms."""
    if not any(is_script_arm(spec, a) for a in spec.arms) or spec._stored_scripts is not None:
        return
    store.write_bytes(spec.name, STORED_ARMS, (json.dumps(stored_records(spec), indent=1, sort_keys=True) + "\n").encode())


def read_stored(store: Any, experiment: str) -> dict[str, dict] | None:
    """script_arms.json of an experiment (None when it has none or it is unreadable)."""
    raw = store.read_bytes(experiment, STORED_ARMS)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None

"""Every spec in experiments/ loads, resolves on its preset and dry-runs; proxy twins match.

    python -m pytest tests/ablate/test_experiments.py -q

Checks, per file in experiments/*.yaml:
- it validates through `ablate.spec.model.load_spec` (falls back to a YAML + trainer-config check
  when ablate.spec.model is not importable);
- every arm resolves with `trainer.config` on its preset, and no two arms resolve to the same
  config (an arm that silently equals another would waste its runs);
- `ablate run <spec> --dry-run` exits 0 and names every arm;
- every `X_small.yaml` has a full-size `X.yaml` with the same arms, whose resolved configs differ
  only in model size, schedule length/batch, eval size and data/cache location;
- the community-question specs follow the conventions of experiments/README.md;
- a script spec (trainer.script, e.g. upstream_record.yaml) whose script the user obtains is
  validated against a stand-in script made of its patches' preimages (so every patch is checked
  to apply), and in place it fails with the spec's own instructions for obtaining the script.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.config import ConfigError, apply_overrides, config_hash, flatten, to_dict
from trainer.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "experiments"
SPECS = sorted(EXP.glob("*.yaml"))

# The community-question specs (full-size form → whether a 1-GPU `_small` twin exists).
QUESTIONS = {
    "normuon_scope": True,
    "normuon_orientation": True,
    "muon_lr": True,
    "ws_schedule": True,
    "lr_mul_layout": True,
    "sa_lambda_init": True,
    "grad_accum_reduction": True,
    "record_check": False,  # the 3.28 target only means something full-size on FineWeb
    # the knobs of issue 16
    "wo_orientation": True,
    "smear_gate_adam": True,
    "polar_steps": True,
    "record_numerics": True,
    "data_order": True,
}
# Full-size forms that run at world size 1 on purpose (the question needs grad accumulation).
ONE_GPU_FULL = {"grad_accum_reduction"}

# Resolved-config keys a `_small` twin may change: size, length, batch, eval, data, cache location.
SCALE_KEYS = {
    "preset", "seed",
    "model.model_dim", "model.num_heads", "model.head_dim",
    "schedule.num_scheduled_iterations", "schedule.num_extension_iterations",
    "schedule.train_bs_schedule", "schedule.train_bs_extension",
    "eval.val_tokens", "eval.val_batch_size", "eval.val_loss_every",
    "runtime.warmup_steps_per_stage", "runtime.inductor_cache_dir",
    "optim.muon.momentum_warmup_steps", "optim.muon.momentum_cooldown_steps",  # scaled with length
}
SCALE_PREFIXES = ("data.",)


_flat = flatten  # nested → dotted keys, the trainer's own


def _raw(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: a spec is a YAML mapping"
    return data


def _script(data: dict[str, Any]) -> str | None:
    return (data.get("trainer") or {}).get("script")


def _loadable(path: Path, tmp_path: Path) -> Path:
    """The spec itself, or, for a script spec whose script is absent (users obtain it: trainer.obtain),
    a copy of experiments/ in tmp_path with a stand-in script: the preimage (context and removed
    lines) of every hunk of the spec's patches, so validation checks that each patch applies."""
    data = _raw(path)
    script = _script(data)
    if script is None or (path.parent / script).exists():
        return path
    from ablate.spec.patch import parse_patch

    copy = tmp_path / "experiments"
    shutil.copytree(EXP, copy)
    chunks: list[str] = []
    for arm in (data["arms"] or {}).values():
        patches = (arm or {}).get("patch") or []
        for p in [patches] if isinstance(patches, str) else patches:
            for fp in parse_patch((path.parent / p).read_text(), p):
                chunks += ["".join(h.old()) for h in fp.hunks]
    (copy / script).parent.mkdir(parents=True, exist_ok=True)
    (copy / script).write_text("# stand-in for the obtained script (tests/ablate/test_experiments.py)\n"
                               + "".join(chunks))
    return copy / path.name


def _resolve(data: dict[str, Any], arm: str):
    """The arm's TrainConfig: preset → trainer.set → arm overrides."""
    trainer = data["trainer"]
    cfg = get_preset(trainer["preset"])
    cfg = apply_overrides(cfg, _flat(trainer.get("set") or {}))
    return apply_overrides(cfg, _flat(data["arms"][arm] or {}))


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_experiments_folder_holds_every_question() -> None:
    names = {p.stem for p in SPECS}
    for q, has_small in QUESTIONS.items():
        assert q in names, f"experiments/{q}.yaml is missing"
        assert (f"{q}_small" in names) == has_small, f"experiments/{q}_small.yaml presence should be {has_small}"


@pytest.mark.parametrize("path", SPECS, ids=_ids(SPECS))
def test_spec_validates(path: Path, tmp_path: Path) -> None:
    try:
        from ablate.spec.model import load_spec
    except ImportError:
        load_spec = None
    data = _raw(path)
    if load_spec is not None:
        spec = load_spec(_loadable(path, tmp_path))
        assert spec.name == data["name"]
        assert list(spec.arms) == list(data["arms"])
        assert spec.baseline in spec.arms
    else:  # minimal check until ablate.spec.model exists
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", data["name"]), data["name"]
        assert "baseline" in data["arms"]
    if _script(data):  # a script spec: no trainer config to resolve
        return
    for arm in data["arms"]:
        try:
            _resolve(data, arm)
        except ConfigError as e:
            pytest.fail(f"{path.name}, arm {arm!r}: {e}")


@pytest.mark.parametrize("path", SPECS, ids=_ids(SPECS))
def test_arms_resolve_to_distinct_configs(path: Path, tmp_path: Path) -> None:
    data = _raw(path)
    hashes: dict[str, str] = {}
    if _script(data):  # a script spec: its arms' code (script, patches, env, args) must differ
        from ablate.spec.model import load_spec

        spec = load_spec(_loadable(path, tmp_path))
    for arm in data["arms"]:
        h = spec.config_hash(arm) if _script(data) else config_hash(_resolve(data, arm))
        assert h not in hashes.values(), (
            f"{path.name}: arm {arm!r} resolves to the same config as arm "
            f"{[a for a, x in hashes.items() if x == h][0]!r}")
        hashes[arm] = h


SMALL = [p for p in SPECS if p.stem.endswith("_small")]


@pytest.mark.parametrize("small", SMALL, ids=_ids(SMALL))
def test_small_twin_matches_full_size_spec(small: Path) -> None:
    full = small.with_name(small.name.replace("_small.yaml", ".yaml"))
    assert full.exists(), f"{small.name} has no full-size counterpart {full.name}"
    s, f = _raw(small), _raw(full)
    assert s["arms"] == f["arms"], f"{small.name}: arms differ from {full.name}"
    assert s.get("baseline", "baseline") == f.get("baseline", "baseline")
    assert s["seeds"] == f["seeds"] and s.get("retries") == f.get("retries")
    assert s["trainer"]["preset"] == "small" and s["resources"]["gpus_per_run"] == 1
    for arm in f["arms"]:
        cs, cf = _flat(to_dict(_resolve(s, arm))), _flat(to_dict(_resolve(f, arm)))
        differ = {k: (cf[k], cs[k]) for k in cf
                  if cf[k] != cs[k] and k not in SCALE_KEYS and not k.startswith(SCALE_PREFIXES)}
        assert not differ, f"{small.name} arm {arm!r} differs from {full.name} beyond scale: {differ}"
        # Proxies run one batch shape (one compiled graph; trainer/presets.py `small`).
        assert len(cs["schedule.train_bs_schedule"]) == 1, arm


def test_small_twin_of_1027_spec_is_really_1027() -> None:
    """The check above must catch a twin that forgets the 10-27 settings."""
    f = _raw(EXP / "muon_lr.yaml")
    s = _raw(EXP / "muon_lr_small.yaml")
    s["trainer"] = {"preset": "small"}  # drop the 10-27 emulation
    cs, cf = _flat(to_dict(_resolve(s, "baseline"))), _flat(to_dict(_resolve(f, "baseline")))
    assert cs["model.weight_layout"] != cf["model.weight_layout"]
    assert cs["optim.muon.lr"] == 0.023 and cf["optim.muon.lr"] == 0.03


@pytest.mark.parametrize("q", list(QUESTIONS))
def test_question_spec_conventions(q: str) -> None:
    data = _raw(EXP / f"{q}.yaml")
    assert data["name"] == q
    desc = data["description"]
    assert isinstance(desc, str) and "\n" not in desc and len(desc) <= 200, desc
    for arm in data["arms"]:
        assert arm in desc, f"{q}: description should name arm {arm!r}"
    assert data["trainer"]["preset"] in ("speedrun", "speedrun-1027")
    assert data["resources"]["gpus_per_run"] == (1 if q in ONE_GPU_FULL else 8)
    assert data["target_loss"] == 3.28
    assert data["retries"] == 1
    if q == "record_check":
        assert data["seeds"] == {"min": 4, "max": 16, "alpha": 0.01}
        assert list(data["arms"]) == ["baseline"]
    else:
        assert data["seeds"] == 8
    # Full-size forms train on real FineWeb prepared by cluster.yaml, never on synthetic shards.
    ts = data["trainer"]["set"]
    assert ts["data.synthetic"] is False
    cluster = (ROOT / "cluster.yaml").read_text()
    assert f"{data['data_root']}/{ts['data.data_dir']}" in cluster
    assert data["resources"]["compile_cache_dir"] == "/opt/ablate-cache" and "/opt/ablate-cache" in cluster
    if (EXP / f"{q}_small.yaml").exists():
        small = _raw(EXP / f"{q}_small.yaml")
        assert small["name"] == f"{q}_small"
        for arm in small["arms"]:
            assert arm in small["description"], f"{q}_small: description should name arm {arm!r}"


def test_effective_lr_multipliers_of_lr_mul_layout() -> None:
    """effective = lr_mul × max(1, rows/cols)^½ (tall rule); 12-11 tall storage gives factor 2."""
    data = _raw(EXP / "lr_mul_layout.yaml")
    want = {"baseline": (2, 2, 4), "all-2": (2, 2, 2), "all-1": (1, 1, 1)}
    for arm, eff in want.items():
        cfg = _resolve(data, arm)
        assert cfg.model.weight_layout == "tall"
        factor = 2.0 if cfg.optim.muon.tall_lr_rule else 1.0  # (4d, d): sqrt(4)
        m = cfg.optim.lr_mul
        assert (m.attn * factor, m.mlp_up * factor, m.mlp_down * factor) == eff, arm


def test_orientation_arms_move_only_the_axes() -> None:
    """Each normuon_orientation arm differs from the baseline in optim.muon.orientation only, and
    its axes are the 10-27 ones for the families it names (storage, LRs and init stay 12-11's)."""
    data = _raw(EXP / "normuon_orientation.yaml")
    base = _flat(to_dict(_resolve(data, "baseline")))
    ten27 = _flat(to_dict(get_preset("speedrun-1027")))
    moved = {"gates-1027": {"attn_gate", "smear_gate"}, "attn-1027": {"attn_qkv", "attn_o"},
             "all-1027": {"attn_gate", "smear_gate", "attn_qkv", "attn_o"}}
    for arm, fams in moved.items():
        cfg = _flat(to_dict(_resolve(data, arm)))
        diff = {k for k in cfg if cfg[k] != base[k]}
        assert diff == {f"optim.muon.orientation.{f}" for f in fams}, arm
        assert all(cfg[k] == ten27[k] for k in diff), arm


# (spec, arm) → the dotted keys it changes against its baseline, and to what.
ISSUE16_ARMS = {
    ("wo_orientation", "wo-input"): {"optim.muon.orientation.attn_o": "input"},
    ("smear_gate_adam", "smear-adam"): {"optim.optimizer.smear_gate": "adam"},
    ("smear_gate_adam", "smear-adam-lr-0.01"): {"optim.optimizer.smear_gate": "adam", "optim.lr_mul.smear_gate": 0.01},
    ("polar_steps", "pe-4"): {"optim.muon.polar_coeffs": "pe-4"},
    ("polar_steps", "pe-3"): {"optim.muon.polar_coeffs": "pe-3"},
    ("record_numerics", "rope-fp32"): {"model.rope_dtype": "fp32"},
    ("record_numerics", "gate-moment-fp32"): {"optim.muon.second_moment_dtype": "fp32"},
    ("record_numerics", "scale-in-q"): {"model.scale_in_kernel": False},
    ("data_order", "shuffled"): {"data.order": "shuffled"},
}


@pytest.mark.parametrize("spec,arm", list(ISSUE16_ARMS))
def test_issue16_arms_change_exactly_their_knob(spec: str, arm: str) -> None:
    """Against the baseline (the records' values), full size and proxy: only the question's knob."""
    for name in (spec, f"{spec}_small"):
        data = _raw(EXP / f"{name}.yaml")
        base, cfg = (_flat(to_dict(_resolve(data, a))) for a in ("baseline", arm))
        assert {k: cfg[k] for k in cfg if cfg[k] != base[k]} == ISSUE16_ARMS[(spec, arm)], name


SCRIPT_SPECS = [p for p in SPECS if _script(_raw(p))]


@pytest.mark.parametrize("path", SCRIPT_SPECS, ids=_ids(SCRIPT_SPECS))
def test_script_spec_says_how_to_obtain_its_script(path: Path, tmp_path: Path) -> None:
    """Without the script (which users obtain), validation names the missing file and quotes the
    spec's trainer.obtain; with a stand-in, the arms are the script and its patched variants."""
    from ablate.errors import SpecError
    from ablate.spec.model import load_spec

    data = _raw(path)
    obtain = data["trainer"].get("obtain")
    assert obtain and _script(data) in obtain.replace("experiments/", ""), "trainer.obtain must write the script"
    copy = tmp_path / "bare"
    shutil.copytree(EXP, copy, ignore=shutil.ignore_patterns(Path(_script(data)).name))
    with pytest.raises(SpecError) as e:
        load_spec(copy / path.name)
    assert f"trainer.script={_script(data)!r}: no such file" in str(e.value)
    assert f"fix: obtain it first: {obtain}" in str(e.value)
    spec = load_spec(_loadable(path, tmp_path / "standin"))
    assert all(spec.is_script_arm(a) for a in spec.arms)
    assert spec.overrides(spec.baseline) == {"script": _script(data)}  # the baseline runs the script as it is


def test_readme_lists_every_spec() -> None:
    text = (EXP / "README.md").read_text()
    for name in [p.name for p in SPECS] + ["smoke.yaml", "lr_mul_search.yaml"]:
        assert name in text, f"experiments/README.md does not list {name}"


@pytest.mark.parametrize("path", SPECS, ids=_ids(SPECS))
def test_dry_run_expands(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    spec_path = _loadable(path, tmp_path / "standin")
    monkeypatch.chdir(tmp_path)  # anything a dry run writes by mistake lands here
    from ablate.cli import app

    result = CliRunner().invoke(app, ["run", str(spec_path), "--dry-run"], env={"COLUMNS": "240"})
    out = result.output  # stdout and stderr as a terminal would show them (click ≥ 8.2)
    assert result.exit_code == 0, f"ablate run {path.name} --dry-run exited {result.exit_code}:\n{out}"
    data = _raw(path)
    if not data.get("search"):
        for arm in data["arms"]:
            assert arm in out, f"dry run of {path.name} does not show arm {arm!r}:\n{out}"
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir()), \
        "a dry run must not write results"

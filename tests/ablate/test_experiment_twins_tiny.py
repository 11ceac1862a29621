"""The `small` twins of experiments/ in `tiny` form: every arm resolves on the CPU preset, and one
twin (normuon_scope_small: three arms that change the optimizer's code path) runs for real through
`ablate run` — Ray Tune, torchrun with 2 gloo ranks, the store and the table.

    python -m pytest tests/ablate/test_experiment_twins_tiny.py -q
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ablate.spec.model import parse_spec
from ablate.store.parquet import Store
from trainer.config import apply_overrides, config_hash
from trainer.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
TWINS = sorted((ROOT / "experiments").glob("*_small.yaml"))
# What a twin's shared `set` may hold that only fits the small model's size and length.
SIZE_PREFIXES = ("model.model_dim", "model.num_heads", "model.head_dim", "schedule.num_", "schedule.train_bs",
                 "eval.", "data.", "runtime.", "optim.muon.momentum_warmup_steps", "optim.muon.momentum_cooldown_steps")


def tiny_form(path: Path, seeds: int = 1) -> dict:
    """The twin as a CPU spec: preset tiny with smoke.yaml's shortening, same arms and knobs."""
    spec = yaml.safe_load(path.read_text())
    smoke = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    knobs = {k: v for k, v in (spec["trainer"].get("set") or {}).items() if not k.startswith(SIZE_PREFIXES)}
    return {
        "name": f"{spec['name']}_tiny", "description": f"tiny form of {path.name}",
        "trainer": {"preset": "tiny", "set": {**smoke["trainer"]["set"], **knobs}},
        "arms": spec["arms"], "seeds": seeds,
        "resources": {"gpus_per_run": 0, "cpu_ranks_per_run": 2}, "retries": 0,
    }


@pytest.mark.parametrize("path", TWINS, ids=[p.stem for p in TWINS])
def test_twin_arms_resolve_on_tiny(path: Path) -> None:
    data = tiny_form(path)
    spec = parse_spec(data)  # full spec validation, every override checked on the tiny preset
    base = apply_overrides(get_preset("tiny"), data["trainer"]["set"])
    hashes = {config_hash(apply_overrides(base, arm or {})) for arm in data["arms"].values()}
    assert len(hashes) == len(data["arms"]) == len(spec.arm_names)  # every arm still changes something


@pytest.mark.e2e
def test_normuon_scope_twin_runs_in_tiny_form(tmp_path: Path) -> None:
    spec_path = tmp_path / "twin.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_form(ROOT / "experiments" / "normuon_scope_small.yaml")))
    store = tmp_path / "store"
    env = dict(os.environ, COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "ablate", "run", str(spec_path), "--store", str(store)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = Store(str(store)).runs("normuon_scope_small_tiny")
    arms = yaml.safe_load((ROOT / "experiments" / "normuon_scope_small.yaml").read_text())["arms"]
    assert sorted(runs["arm"]) == sorted(arms) and (runs["status"] == "ok").all()
    assert (runs["final_val_loss"] < 6.0).all()  # ln(512) ≈ 6.24 at init: every arm learned
    assert runs["final_val_loss"].nunique() == len(arms)  # the arms really ran different code
    for arm in arms:
        assert arm in res.stdout  # the table

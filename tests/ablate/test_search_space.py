"""The `search:` block: schema, trainer checks, choice encoding.

    python -m pytest tests/ablate/test_search_space.py -q
"""
from __future__ import annotations

import json

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ablate.spec.search_space import SearchSpaceError, base_values, parse_search
from trainer.presets import load_config

SPACE = {
    "optim.lr_mul.attn": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
    "model.backout_layer": {"type": "int", "low": 3, "high": 5},
    "schedule.ws_schedule": {"type": "choice", "values": [[2, 4, 6], [2, 3, 4, 5, 6, 8], [2, 4, 6, 8]]},
    "model.attn_backend": {"type": "choice", "values": ["flex", "sdpa"]},
}


def search(**kw):
    return {"trials": 4, "space": dict(SPACE), **kw}


def errors_of(raw, preset="tiny", base=None) -> str:
    with pytest.raises(SearchSpaceError) as ei:
        parse_search(raw, preset=preset, base_overrides=base)
    return str(ei.value)


def test_defaults_and_distributions():
    cfg = parse_search(search(), preset="tiny")
    assert cfg.sampler == "tpe" and cfg.seeds_per_trial == 2 and cfg.objectives == ["val_loss"]
    assert cfg.pruning is False and cfg.confirm is None and cfg.max_concurrent is None
    d = cfg.distributions()
    assert d["optim.lr_mul.attn"] == FloatDistribution(0.5, 2.0, log=True)
    assert d["model.backout_layer"] == IntDistribution(3, 5)
    assert d["schedule.ws_schedule"] == CategoricalDistribution(
        ["[2, 4, 6]", "[2, 3, 4, 5, 6, 8]", "[2, 4, 6, 8]"])
    assert cfg.metric_columns == ["final_val_loss"]
    assert cfg.seeds() == [0, 1]


def test_choice_roundtrip_decodes_lists_and_applies_to_trainer():
    cfg = parse_search(search(), preset="tiny")
    stored = {"optim.lr_mul.attn": 1.25, "model.backout_layer": 4,
              "schedule.ws_schedule": "[2, 3, 4, 5, 6, 8]", "model.attn_backend": "sdpa"}
    ov = cfg.to_overrides(stored)
    assert ov["schedule.ws_schedule"] == [2, 3, 4, 5, 6, 8]
    assert ov["model.attn_backend"] == "sdpa" and ov["model.backout_layer"] == 4
    tc = load_config("tiny", overrides=ov)
    assert tc.schedule.ws_schedule == (2, 3, 4, 5, 6, 8) and tc.optim.lr_mul.attn == 1.25
    assert cfg.encode(ov) == stored
    # a value SQLite handed back as a list (OptunaSearch-style storage) decodes too
    assert cfg.space["schedule.ws_schedule"].decode([2, 4, 6]) == [2, 4, 6]
    with pytest.raises(SearchSpaceError, match="different space"):
        cfg.to_overrides({**stored, "schedule.ws_schedule": "[1, 2]"})


def test_base_values_and_encode_outside_space():
    cfg = parse_search(search(), preset="tiny")
    base = base_values(cfg, load_config("tiny"))
    assert base == {"optim.lr_mul.attn": 1.0, "model.backout_layer": 4,
                    "schedule.ws_schedule": [2, 4, 6],
                    "model.attn_backend": load_config("tiny").model.attn_backend}
    assert cfg.encode(base)["schedule.ws_schedule"] == "[2, 4, 6]"
    assert cfg.encode({**base, "optim.lr_mul.attn": 3.0}) is None
    assert cfg.encode({**base, "schedule.ws_schedule": [1, 2]}) is None
    base2 = base_values(cfg, load_config("tiny", {"optim.lr_mul.attn": 0.7}))
    assert base2["optim.lr_mul.attn"] == 0.7


@pytest.mark.parametrize("param, needle", [
    ({"type": "float", "low": 2.0, "high": 0.5}, "low (2.0) > high (0.5); swap them"),
    ({"type": "int", "low": 5, "high": 3}, "low (5) > high (3)"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log: true needs low > 0"),
    ({"type": "float", "low": -1.0, "high": 1.0, "log": True}, "log: true needs low > 0"),
    ({"type": "int", "low": 0, "high": 4, "log": True}, "log: true needs low ≥ 1"),
    ({"type": "choice", "values": []}, "values is empty"),
    ({"type": "choice", "values": [[3, 7]]}, "only one value"),
    ({"type": "choice", "values": [[3, 7], "[3, 7]"]}, "duplicate values"),
    ({"type": "float", "low": 1.0, "high": 1.0}, "a fixed value belongs in trainer.set"),
    ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "step and log"),
    ({"type": "uniform", "low": 0.1, "high": 1.0}, "needs type: float, int or choice"),
    ({"type": "float", "low": 0.1, "hi": 1.0}, "hi"),
])
def test_bad_params_name_the_field(param, needle):
    msg = errors_of({"trials": 2, "space": {"optim.lr_mul.attn": param}})
    assert needle in msg
    assert "search.space.optim.lr_mul.attn" in msg


def test_unknown_key_gets_close_matches():
    msg = errors_of({"trials": 2, "space": {"optim.lr_mul.mlp_upp": {"type": "float", "low": 0.5, "high": 2}}})
    assert "unknown config key 'optim.lr_mul.mlp_upp'" in msg
    assert "optim.lr_mul.mlp_up" in msg


def test_trainer_rejects_values_and_types():
    msg = errors_of({"trials": 2, "space": {
        "optim.lr_mul.mlp_up": {"type": "float", "low": -1.0, "high": 2.0},
        "model.num_heads": {"type": "float", "low": 1.0, "high": 4.0},
        "model.premul_o": {"type": "int", "low": 0, "high": 1},
        "schedule.ws_schedule": {"type": "choice", "values": [[2, 4, 6], "abc"]},
        "seed": {"type": "int", "low": 0, "high": 3},
    }})
    lines = msg.splitlines()
    assert any("optim.lr_mul.mlp_up: low -1.0" in ln and "≥ 0" in ln for ln in lines)
    assert any("model.num_heads: the setting is an integer; use type: int" in ln for ln in lines)
    assert any("model.premul_o" in ln and "use type: choice" in ln for ln in lines)
    assert any("schedule.ws_schedule: value 'abc'" in ln for ln in lines)
    assert any("search.space.seed: cannot be searched" in ln for ln in lines)


def test_block_level_errors_are_collected():
    msg = errors_of({"trials": 0, "space": {}, "sampler": "cmaes", "objectives": ["train_time"],
                     "storage": "optuna.db", "pruning": True, "bogus": 1})
    for needle in ("search.trials", "search.space: space is empty", "search.sampler",
                   "search.objectives", "search.storage", "search.pruning: true is not supported",
                   "search.bogus"):
        assert needle in msg, needle


def test_base_config_errors_are_reported():
    msg = errors_of(search(), base={"optim.muon.lrr": 0.1})
    assert "base config" in msg and "optim.muon.lr" in msg


def test_two_objectives_and_confirm():
    cfg = parse_search(search(objectives=["val_loss", "train_time"], confirm={"top_k": 2, "seeds": 4},
                              sampler="nsga2", sampler_seed=7, max_concurrent=3), preset="tiny")
    assert cfg.multi_objective and cfg.metric_columns == ["final_val_loss", "train_time_ms"]
    assert cfg.confirm.top_k == 2 and cfg.confirm.seeds == 4 and cfg.confirm.first_seed == 1000
    assert errors_of(search(confirm={"top_k": 0}))  # top_k ≥ 1
    assert "seeds" in errors_of(search(confirm={"seeds": 1}))


def test_fingerprint_tracks_what_makes_values_comparable():
    a = parse_search(search(), preset="tiny")
    b = parse_search(search(trials=40, sampler="random", max_concurrent=2), preset="tiny")
    c = parse_search(search(objectives=["val_loss", "train_time"]), preset="tiny")
    space = json.loads(json.dumps(SPACE))
    space["optim.lr_mul.attn"]["high"] = 3.0
    d = parse_search({"trials": 4, "space": space}, preset="tiny")
    e = parse_search(search(seeds_per_trial=3), preset="tiny")
    assert a.fingerprint() == b.fingerprint()  # budget, sampler, concurrency may change on resume
    assert len({a.fingerprint(), c.fingerprint(), d.fingerprint(), e.fingerprint()}) == 4


def test_shipped_search_specs_validate():
    import pathlib

    import yaml

    root = pathlib.Path(__file__).resolve().parents[2] / "experiments"
    for name in ("lr_mul_search.yaml", "lr_mul_search_tiny.yaml"):
        spec = yaml.safe_load((root / name).read_text())
        tr = spec["trainer"]
        base = {**(tr.get("set") or {}), **(spec.get("arms", {}).get("baseline") or {})}
        cfg = parse_search(spec["search"], preset=tr["preset"], base_overrides=base)
        assert "schedule.ws_schedule" in cfg.space
        assert cfg.confirm is not None
        # the record's values are the first (enqueued) suggestion
        assert cfg.encode(base_values(cfg, load_config(tr["preset"], base))) is not None


def test_run_search_rejects_a_bad_space_before_anything_runs(tmp_path):
    import ray

    from ablate.errors import SpecError
    from ablate.spec.model import parse_spec

    # Spec validation (`ablate validate`, `ablate run`) checks the space before Ray or a study exists.
    with pytest.raises(SpecError) as ei:
        parse_spec({"name": "bad", "trainer": {"preset": "tiny"}, "arms": {"baseline": {}}, "seeds": 1,
                    "resources": {"gpus_per_run": 0},
                    "search": {"trials": 2, "space": {"optim.lr_mul.atn": {"type": "float", "low": 2, "high": 1}}}})
    assert "low (2.0) > high (1.0)" in str(ei.value)
    assert not ray.is_initialized() and not any(tmp_path.iterdir())  # no Ray, no store files, no study


def test_a_search_spec_parses_its_search_block_once_and_resolves_the_base_once(monkeypatch):
    """Validation parses the search block against the baseline's config it already resolved; the
    driver and the plan reuse that SearchConfig (Spec.search_config), nothing is resolved again."""
    from ablate.spec import search_space
    from ablate.spec.model import parse_spec

    calls = {"parse": 0, "load": 0}
    parse, load = search_space.parse_search, search_space.load_config

    def counting_parse(*a, **k):
        calls["parse"] += 1
        return parse(*a, **k)

    def counting_load(*a, **k):
        calls["load"] += 1
        return load(*a, **k)

    monkeypatch.setattr(search_space, "parse_search", counting_parse)
    monkeypatch.setattr(search_space, "load_config", counting_load)
    spec = parse_spec({"name": "s", "trainer": {"preset": "tiny"}, "arms": {"baseline": {}}, "seeds": 1,
                       "resources": {"gpus_per_run": 0}, "search": search()})
    assert calls == {"parse": 1, "load": 0}  # the base: the baseline arm's config, resolved once already
    cfg = spec.search_config()
    assert spec.search_config() is cfg and calls == {"parse": 1, "load": 0}
    assert base_values(cfg, spec.resolve("baseline"))["optim.lr_mul.attn"] == 1.0

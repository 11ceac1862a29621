"""The typed config tree: presets, dotted overrides, errors, hashing.

    python -m pytest tests/trainer/test_config.py -q
"""
import pytest

from trainer.config import (
    ConfigError, apply_overrides, config_hash, load_config, parse_set, to_dict, valid_keys,
)
from trainer.presets import PRESETS, get_preset


def test_presets_build_and_differ_where_the_records_differ():
    new, old = get_preset("speedrun"), get_preset("speedrun-1027")
    assert new.schedule.num_iterations == 2160 and old.schedule.num_iterations == 2285
    assert (new.optim.muon.lr, old.optim.muon.lr) == (0.023, 0.03)
    assert (new.model.weight_layout, old.model.weight_layout) == ("tall", "wide")
    assert (new.optim.lr_mul.mlp_up, new.optim.lr_mul.mlp_down) == (1.0, 2.0)
    assert (old.optim.lr_mul.mlp_up, old.optim.lr_mul.mlp_down) == (2.0, 1.0)
    assert new.schedule.train_bs_schedule == (131072, 262144, 393216)
    assert old.schedule.train_bs_schedule == (262144,)
    assert len({config_hash(get_preset(p)) for p in PRESETS}) == len(PRESETS)


def test_dotted_and_nested_overrides_coerce_types():
    cfg = load_config("tiny", {"optim.muon.lr": 1, "schedule": {"ws_schedule": [3, 5, 7, 9]}})
    assert cfg.optim.muon.lr == 1.0 and isinstance(cfg.optim.muon.lr, float)
    assert cfg.schedule.ws_schedule == (3, 5, 7, 9)
    assert to_dict(cfg)["schedule"]["ws_schedule"] == [3, 5, 7, 9]


def test_unknown_keys_are_all_reported_with_close_matches():
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("tiny"), {"optim.muon.lrr": 0.1, "model.num_layer": 3})
    msg = str(e.value)
    assert "optim.muon.lrr" in msg and "optim.muon.lr" in msg
    assert "model.num_layer" in msg and "model.num_layers" in msg


@pytest.mark.parametrize("key,value,needle", [
    ("optim.muon.lr", "fast", "expected a number"),
    ("optim.muon.cautious_wd", "yes", "expected true or false"),
    ("schedule.ws_schedule", "3,7,11", "expected a list"),
    ("model.weight_layout", "diagonal", "expected one of"),
    ("model.sa_lambdas_init", [0.5], "exactly 2"),
    ("model.num_heads", 5, "must equal model_dim"),
])
def test_bad_values_name_the_key_and_the_fix(key, value, needle):
    with pytest.raises(ConfigError) as e:
        load_config("speedrun", {key: value})
    assert key.split(".")[-1] in str(e.value) and needle in str(e.value)


def test_hash_ignores_cache_location_but_not_knobs():
    base = load_config("tiny")
    assert config_hash(base) == config_hash(load_config("tiny", {"runtime.inductor_cache_dir": "/nvme/c"}))
    assert config_hash(base) == config_hash(load_config("tiny", seed=7))
    assert config_hash(base) != config_hash(load_config("tiny", {"optim.adam.eps": 1e-10}))


def test_parse_set_reads_yaml_values():
    assert parse_set(["a.b=[3, 7]", "c=false", "d=0.5", "e=text"]) == {"a.b": [3, 7], "c": False, "d": 0.5, "e": "text"}
    with pytest.raises(ConfigError):
        parse_set(["novalue"])


def test_every_catalog_knob_named_in_the_issue_is_a_field():
    keys = set(valid_keys())
    for k in ["optim.muon.variance_norm.attn", "optim.muon.variance_norm.mlp", "optim.muon.variance_norm.gates",
              "optim.muon.orientation", "optim.muon.tall_lr_rule", "optim.muon.cautious_wd",
              "optim.muon.momentum_min", "optim.muon.momentum_max", "optim.muon.momentum_warmup_steps",
              "optim.muon.momentum_cooldown_steps", "optim.muon.beta2", "optim.muon.weight_decay",
              "optim.adam.betas", "optim.adam.eps", "optim.adam.weight_decay", "optim.adam.every_other_step",
              "schedule.ws_schedule", "schedule.ws_final", "schedule.ws_validate", "schedule.train_bs_schedule",
              "schedule.num_scheduled_iterations", "schedule.num_extension_iterations", "schedule.cooldown_frac",
              "model.sa_lambdas_init", "model.block_lambdas_init", "model.premul_o", "model.no_attn_layers",
              "model.no_mlp_layers", "model.ve_layout", "model.fp8_head", "model.weight_layout",
              "model.attn_backend", "optim.grad_reduction", "seed"]:
        assert k in keys, k
    for fam in ["attn", "mlp_up", "mlp_down", "attn_gate", "smear_gate", "embed", "value_embed", "scalars", "head"]:
        assert f"optim.lr_mul.{fam}" in keys and f"optim.wd_mul.{fam}" in keys

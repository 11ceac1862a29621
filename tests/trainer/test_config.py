"""The typed config tree: presets, dotted overrides, errors, hashing.

    python -m pytest tests/trainer/test_config.py -q
"""
import pytest

from trainer.config import (
    ConfigError, apply_overrides, config_hash, flatten, parse_set, to_dict, valid_keys,
)
from trainer.presets import PRESETS, get_preset, load_config


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
              "optim.muon.orientation.attn_qkv", "optim.muon.tall_lr_rule", "optim.muon.cautious_wd",
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


ISSUE16_KNOBS = {  # key → the records' value (both records unless the preset says otherwise)
    "data.order": "file",
    "model.rope_dtype": "bf16",
    "optim.muon.second_moment_dtype": "param",
    "optim.optimizer.smear_gate": "normuon",
    "optim.optimizer.attn_gate": "normuon",
    "optim.muon.polar_coeffs": "record-5",
    "schedule.short_window_ratio": 0.5,
    "model.yarn_attn_factor": 0.2,
    "model.fp8_x_scale": 0.0,  # → √768/448
    "model.fp8_w_scale": 2.0 ** -9,
    "model.fp8_grad_scale": 1 / 448,
    "model.qk_norm": True,
    "model.mlp_activation": "relu2",
    "model.param_dtype.attn": "fp32",
    "model.param_dtype.embed": "bf16",
    "model.param_dtype.scalars": "fp32",
    "optim.adam.state_dtype": "bf16",
    "data.data_dir": "data/fineweb10B",
    "data.synthetic": False,
}


@pytest.mark.parametrize("preset", ["speedrun", "speedrun-1027"])
def test_issue16_knobs_exist_with_the_records_values(preset):
    flat = dict(flatten(to_dict(get_preset(preset))))
    for key, want in ISSUE16_KNOBS.items():
        assert flat[key] == want, (preset, key)
    want_o = "output" if preset == "speedrun" else "input"  # 10-27: shape rule on wide storage
    assert flat["optim.muon.orientation.attn_qkv"] == flat["optim.muon.orientation.attn_o"] == want_o
    from trainer.model import GPT

    assert GPT(get_preset(preset).model).fp8_scales[0] == pytest.approx(768 ** 0.5 / 448)


def test_proxies_keep_their_synthetic_data():
    for preset, d in (("small", "data/synth-small"), ("tiny", "data/synth-tiny")):
        cfg = get_preset(preset)
        assert cfg.data.synthetic is True and cfg.data.data_dir == d and cfg.data.order == "file"
    # An explicit data.synthetic=true still works on the speedrun presets (GPU benchmarks use it).
    assert load_config("speedrun", {"data.synthetic": True}).data.synthetic is True


@pytest.mark.parametrize("key,value,needle", [
    ("optim.optimizer.smear_gate", "sgd", "expected one of"),
    ("optim.muon.orientation.attn_o", "neuron", "expected one of"),
    ("optim.muon.polar_coeffs", "pe-2", "expected one of"),
    ("optim.muon.polar_iters", 4, "unknown config key"),
    ("schedule.short_window_ratio", 0.0, "must be in (0, 1]"),
    ("model.fp8_w_scale", 0.0, "must be > 0"),
    ("data.order", "random", "expected one of"),
    ("model.param_dtype.attn", "fp16", "expected one of"),
])
def test_issue16_bad_values_are_refused(key, value, needle):
    with pytest.raises(ConfigError) as e:
        load_config("speedrun", {key: value})
    assert needle in str(e.value)


def test_describe_keys_covers_every_key():
    from trainer.config import describe_keys

    rows = describe_keys()
    assert [r["key"] for r in rows] == valid_keys()
    assert all(r["meaning"] and r["type"] for r in rows)
    by = {r["key"]: r for r in rows}
    assert by["optim.lr_mul.attn"]["meaning"].startswith("LR multiplier")
    assert by["optim.muon.polar_coeffs"]["type"] == "record-5|pe-4|pe-3"


def test_differences_table_names_real_fields():
    """docs/trainer.md's "Differences from the record scripts" table: every config field it names
    exists (a renamed or removed knob fails here), and it covers the issue-16 numerics."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    table = text.split("## Differences from the record scripts", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`((?:model|optim|data|schedule|runtime)\.[a-z_0-9.<>*]+)", table))
    keys = valid_keys()
    for name in names:
        stem = name.split(".<")[0].split(".*")[0].rstrip(".")
        assert any(k == stem or k.startswith(stem + ".") for k in keys), name
    for field in ("data.order", "model.rope_dtype", "optim.muon.second_moment_dtype", "optim.adam.state_dtype",
                  "model.scale_in_kernel", "model.attn_backend"):
        assert field in names, field


def test_config_does_not_import_presets():
    """presets builds on config, never the other way (no cycle, not even a function-level import)."""
    import ast
    from pathlib import Path

    import trainer.config

    tree = ast.parse(Path(trainer.config.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("trainer.")}, imported
    assert load_config("tiny", {"optim.muon.lr": 0.03}, seed=3).optim.muon.lr == 0.03

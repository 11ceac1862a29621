"""Named starting points of the config tree, and `load_config`: a preset plus overrides.

    from trainer.presets import load_config
    cfg = load_config("tiny", overrides={"optim.muon.lr": 0.03}, seed=0)

- `speedrun`      the 2025-12-11 record (NorMuon optims and fixes, 2160 steps); the default.
- `speedrun-1027` the 2025-10-27 record (FixMuonLR, 2285 steps).
- `small`         a one-GPU proxy with the speedrun's structure (12 layers, same knobs) that
                  finishes in minutes on one H100.
- `tiny`          CPU: 6 layers of width 64 on a 512-token synthetic vocabulary; two gloo ranks
                  finish in seconds. Used by tests and the demo experiment.

The `speedrun*` presets read FineWeb from `data/fineweb10B` (`python -m trainer.data fineweb
--out data/fineweb10B`) and train on synthetic data only with an explicit `data.synthetic: true`;
`small` and `tiny` generate their synthetic shards on first use. Every preset keeps the records'
data order (`data.order: file`) and numerics (bf16 RoPE, bf16 gate second moments).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from trainer.config import (
    AdamConfig, ConfigError, DataConfig, EvalConfig, FamilyMults, ModelConfig, MuonConfig,
    OptimConfig, RuntimeConfig, ScheduleConfig, SynthConfig, TrainConfig, apply_overrides,
)


def _speedrun() -> TrainConfig:
    return TrainConfig(preset="speedrun")


def _speedrun_1027() -> TrainConfig:
    return apply_overrides(TrainConfig(preset="speedrun-1027"), {
        "model.weight_layout": "wide",
        "model.sa_lambdas_init": [0.5, 0.5],
        "model.premul_o": False,
        "model.block_lambdas_init": [1.0, 0.0],
        "model.skip_mode": "unet",
        "optim.muon.lr": 0.03,
        "optim.muon.weight_decay": 0.0,
        "optim.muon.cautious_wd": False,
        "optim.muon.wd_lr_scaled": False,
        # 10-27's shape rule on its wide storage, per family (trainer-spec §1d)
        "optim.muon.orientation": {"attn_qkv": "input", "attn_o": "input", "mlp_up": "output",
                                   "mlp_down": "input", "attn_gate": "input", "smear_gate": "input"},
        "optim.muon.norm_fp32": False,
        "optim.lr_mul.mlp_up": 2.0,
        "optim.lr_mul.mlp_down": 1.0,
        "optim.grad_reduction": "sum",
        "schedule.num_scheduled_iterations": 2245,
        "schedule.num_extension_iterations": 40,
        "schedule.cooldown_frac": 0.50,
        "schedule.lr_max_stages": [1.0],
        "schedule.lr_max_thresholds": [],
        "schedule.lr_flat_extension": False,
        "schedule.train_bs_schedule": [262144],
        "schedule.train_bs_extension": 262144,
    })


def _small() -> TrainConfig:
    # Same 12-layer structure and knobs as `speedrun`, narrower and shorter, and ONE batch size:
    # every distinct batch shape is its own compiled graph, and a cold compile of one took 1.5–5 min
    # on an H100 (docs/performance.md), so three stages would spend most of a proxy run compiling.
    # The window and LR stages are kept (windows do not recompile). Override
    # schedule.train_bs_schedule to ablate the batch-size schedule itself.
    return apply_overrides(TrainConfig(preset="small"), {
        "model.model_dim": 384,
        "model.num_heads": 3,
        "model.head_dim": 128,
        "schedule.num_scheduled_iterations": 600,
        "schedule.num_extension_iterations": 20,
        "schedule.train_bs_schedule": [65536],
        "schedule.train_bs_extension": 65536,
        "schedule.lr_max_thresholds": [0.33, 0.66],
        "eval.val_tokens": 1_048_576,
        "eval.val_batch_size": 262_144,
        "eval.val_loss_every": 100,
        "optim.muon.momentum_warmup_steps": 90,  # 300/2160 of the schedule, as in the record
        "optim.muon.momentum_cooldown_steps": 15,
        "runtime.warmup_steps_per_stage": 4,
        "data.data_dir": "data/synth-small",
        "data.synthetic": True,
        "data.synth.train_tokens": 100_000_000,
        "data.synth.val_tokens": 1_048_576,
    })


def _tiny() -> TrainConfig:
    return TrainConfig(
        preset="tiny",
        model=ModelConfig(
            vocab_size=512, vocab_pad_multiple=64, num_layers=6, model_dim=64, num_heads=2,
            head_dim=32, no_attn_layers=(0, 3), no_mlp_layers=(0,), long_window_layers=(2, 5),
            ve_layout=(-1, 1, -1, -1, 0, 1), num_value_embeds=2, skip_from=2, skip_to=3,
            backout_layer=4, gate_channels=8, rope_freqs=8, fp8_head=False,
            attn_backend="sdpa",  # FlexAttention has no CPU backward
        ),
        optim=OptimConfig(muon=MuonConfig(momentum_warmup_steps=20, momentum_cooldown_steps=8),
                          adam=AdamConfig()),
        schedule=ScheduleConfig(
            num_scheduled_iterations=60, num_extension_iterations=4, block_size=16,
            ws_schedule=(2, 4, 6), ws_final=8, ws_validate=12,
            train_bs_schedule=(2048, 4096, 4096), train_bs_extension=4096,
        ),
        data=DataConfig(
            data_dir="data/synth-tiny", synthetic=True, bos_id=511, train_max_seq_len=256,
            synth=SynthConfig(train_tokens=2_000_000, val_tokens=32_768, shard_tokens=1_000_000,
                              mean_doc_len=120, zipf_a=1.1, seed=1234),
        ),
        eval=EvalConfig(val_tokens=16_384, val_batch_size=8_192, val_loss_every=20),
        runtime=RuntimeConfig(device="cpu", compile=False, warmup=False, reference_world_size=2),
    )


PRESETS = {
    "speedrun": _speedrun,
    "speedrun-1027": _speedrun_1027,
    "small": _small,
    "tiny": _tiny,
}


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"preset={name!r} is invalid: choose one of {', '.join(PRESETS)}") from None


def load_config(preset: str = "speedrun", overrides: Mapping[str, Any] | None = None,
                config_file: str | None = None, seed: int | None = None) -> TrainConfig:
    """Preset → optional YAML file of overrides → dotted overrides → seed."""
    cfg = get_preset(preset)
    if config_file:
        import yaml

        try:
            with open(config_file) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"--config {config_file!r} cannot be read: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {config_file!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {config_file!r} must hold a mapping of config keys")
        cfg = apply_overrides(cfg, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    return cfg


__all__ = ["PRESETS", "get_preset", "load_config", "FamilyMults"]

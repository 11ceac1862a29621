"""The trainer's one typed configuration tree.

Every knob that changes a run is a field here, and therefore lands in the `start` event and in
every ablate result row. Presets, and `load_config` (a preset plus overrides), live in
`trainer/presets.py`, which builds on this module; overrides are dotted keys:

    from trainer.presets import load_config
    cfg = load_config("tiny", overrides={"optim.muon.lr": 0.03})

    python -m trainer.train --preset small --set optim.muon.lr=0.03 --set schedule.ws_schedule=[3,5,7]

Families used by the per-family multipliers: NorMuon matrices `attn`, `mlp_up`, `mlp_down`,
`attn_gate`, `smear_gate`; Adam tensors `embed`, `value_embed`, `scalars`, `head`.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Mapping

MUON_FAMILIES = ("attn", "mlp_up", "mlp_down", "attn_gate", "smear_gate")
ADAM_FAMILIES = ("embed", "value_embed", "scalars", "head")
FAMILIES = MUON_FAMILIES + ADAM_FAMILIES


class ConfigError(ValueError):
    """Bad configuration input: the message names the key, the value and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
Dtype = Literal["fp32", "bf16"]


@dataclass(frozen=True, kw_only=True)
class FamilyDtypes:
    """Storage dtype of each parameter family; the records cast nn.Embedding/nn.Linear to bf16."""

    attn: Dtype = "fp32"  # qkvo weights
    mlp_up: Dtype = "fp32"  # c_fc
    mlp_down: Dtype = "fp32"  # c_proj
    attn_gate: Dtype = "bf16"  # per-layer attention gates
    smear_gate: Dtype = "bf16"  # smear gate
    embed: Dtype = "bf16"  # token embedding (its dtype is the activations' dtype)
    value_embed: Dtype = "bf16"  # value-embedding tables
    scalars: Dtype = "fp32"  # the packed scalars vector
    head: Dtype = "bf16"  # lm_head


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 50257  # tokens in the tokenizer; BOS is vocab_size - 1 for GPT-2
    vocab_pad_multiple: int = 128  # embed / value-embed / lm_head rows padded up to a multiple
    num_layers: int = 12  # blocks; layer 0 is an empty block in both records
    model_dim: int = 768  # residual width
    num_heads: int = 6  # attention heads
    head_dim: int = 128  # per-head width; num_heads * head_dim must equal model_dim
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * model_dim
    mlp_activation: Literal["relu2", "relu", "gelu", "silu"] = "relu2"  # MLP nonlinearity; records: relu(x)²
    no_attn_layers: tuple[int, ...] = (0, 7)  # layers whose block has no attention
    no_mlp_layers: tuple[int, ...] = (0,)  # layers whose block has no MLP
    long_window_layers: tuple[int, ...] = (4, 11)  # layers using the long window; others short
    # Value-embedding table per layer, -1 = none. 12 layers: [-,1,2,-,-,-,-,-,-,0,1,2].
    ve_layout: tuple[int, ...] = (-1, 1, 2, -1, -1, -1, -1, -1, -1, 0, 1, 2)
    num_value_embeds: int = 3  # value-embedding tables
    # "tall": qkvo (4d, d), c_fc/c_proj (4d, d) as in 12-11; "wide": (d, 4d) as in 10-27.
    weight_layout: Literal["tall", "wide"] = "tall"
    param_dtype: FamilyDtypes = field(default_factory=FamilyDtypes)  # storage dtype per parameter family
    sa_lambdas_init: tuple[float, float] = (0.5, 1.0)  # per-attention-layer (λ0, λ1) init
    # True (12-11): λ0 scales the QKV weight, λ1 scales W_O, ve added unscaled.
    # False (10-27): v = λ0·v + λ1·ve (λ0·v on layers without ve), W_O unscaled.
    premul_o: bool = True
    block_lambdas_init: tuple[float, float] = (1.1, 0.0)  # x ← λa·x + λb·x0 before each block
    # "single" (12-11): output of skip_from added to input of skip_to, gated σ(skip_w[1]).
    # "unet" (10-27): layers 1..n/2-1 pushed, popped LIFO into the next layers, gated σ(skip_w[i]).
    skip_mode: Literal["single", "unet", "none"] = "single"
    skip_from: int = 4  # single-skip source layer
    skip_to: int = 7  # single-skip destination layer
    skip_init: float = -1.5  # logit init of the skip gates (σ ≈ 0.18)
    backout_layer: int = 8  # x ← x − λ_back·x_backout after the last block; -1 disables
    backout_init: float = 0.5  # λ_back init
    smear_gate: bool = True  # mix previous token's embedding in through a learned gate
    attn_gate: bool = True  # per-head output gate σ(W·x[:gate_channels])
    gate_channels: int = 12  # input channels read by the smear and attention gates
    fp8_x_scale: float = 0.0  # FP8 head input scale; 0 = the records' √model_dim/448
    fp8_w_scale: float = 2.0 ** -9  # FP8 head weight scale (records: 2⁻⁹)
    fp8_grad_scale: float = 1.0 / 448  # FP8 head output-gradient scale (records: 1/448)
    qk_norm: bool = True  # RMS-norm q and k before RoPE (both records)
    rope_dtype: Literal["bf16", "fp32"] = "bf16"  # RoPE cos/sin tables and rotation: bf16 (records) or fp32
    rope_freqs: int = 32  # rotating frequencies; head_dim//2 - rope_freqs dims carry no position
    rope_min_freq: float = 1.0 / 1024  # frequencies run from 1 down to this (rad/token)
    attn_scale_init: float = 0.1  # softmax scale before any YaRN window extension
    yarn_attn_factor: float = 0.2  # attn_scale ×= factor·ln(new/old) + 1 per window extension; 0 keeps it fixed
    yarn_alpha: float = 1.0  # YaRN ramp lower bound (in wavelengths per window)
    yarn_beta: float = 32.0  # YaRN ramp upper bound
    logit_softcap: float = 30.0  # logits ← cap·σ(z/softcap_div)
    softcap_div: float = 7.5  # the softcap divisor: logits ← cap·σ(z/softcap_div)
    fp8_head: bool = True  # FP8 lm_head in training via torch._scaled_mm; bf16 where unsupported
    # "auto": fa4 on a Hopper+ GPU where flash-attn-4 imports, else flex on GPU, sdpa on CPU (resolved
    # by the trainer; the resolved name is in the start event, the result row and the run's hash).
    attn_backend: Literal["auto", "fa4", "flex", "sdpa"] = "auto"
    # Softmax scale applied to the q·k scores inside the attention kernel in fp32 (the records'
    # FlashAttention softmax_scale); false pre-multiplies q by it in bf16 instead.
    scale_in_kernel: bool = True
    # FP8 head + softcap + cross-entropy as Triton kernels in training (trainer/head_ce.py; GPU with
    # model.fp8_head only); false keeps PyTorch's graph for them (same math, other rounding, slower).
    fused_head_ce: bool = True
    # q/k RMS-norm + rotary as one Triton kernel per direction (trainer/qk_rotary.py; on GPU, with
    # model.qk_norm and head_dim/2 a power of two, else the unfused ops); false: PyTorch ops that
    # Inductor fuses. Same math, other rounding; 1.5 % faster at the speedrun's 393k stage on an H200.
    fused_qk_rotary: bool = True
    # With fused_qk_rotary and premul_o: the q/k op takes the QKV product whole and passes v (+ ve)
    # through, so its backward writes the product's gradient in one pass instead of Inductor gathering
    # dq, dk, dv with a copy (12.7 ms of the 393k step on an H200). The same bits as off (CPU test in
    # Triton's interpreter); off until timed on a GPU.
    fused_qkv: bool = False
    # The relu² MLP with relu² in the up-projection's matmul epilogue and its derivative in the
    # down-projection's input-gradient matmul (trainer/mlp_relu2.py; GPU, bf16; MLPs with another
    # mlp_activation run unfused); false: cuBLAS matmuls and Inductor's elementwise passes. Same math,
    # other rounding. Off: its forward + backward was 6 % slower than the unfused MLP's on one H200 (session
    # 7) and 3 % faster on another (session 8, bench_mlp); the trainer bench has not compared them yet.
    fused_relu2: bool = False
    init_scale: float = 0.5  # QKV / c_fc uniform bound = √3·init_scale·dim^-½

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def hidden_dim(self) -> int:
        return self.mlp_ratio * self.model_dim

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "head_dim", "mlp_ratio",
                     "vocab_pad_multiple", "num_value_embeds", "gate_channels"):
            if getattr(self, name) < 1:
                _fail(f"model.{name}", getattr(self, name), "must be ≥ 1")
        if self.num_heads * self.head_dim != self.model_dim:
            _fail("model.num_heads", self.num_heads,
                  f"num_heads·head_dim ({self.num_heads}·{self.head_dim}) must equal model_dim "
                  f"({self.model_dim}); change head_dim or num_heads")
        if self.head_dim % 4:
            _fail("model.head_dim", self.head_dim, "must be a multiple of 4 (RoPE halves)")
        if not 0 <= self.rope_freqs <= self.head_dim // 2:
            _fail("model.rope_freqs", self.rope_freqs, f"must be in [0, head_dim/2 = {self.head_dim // 2}]")
        L = self.num_layers
        for name in ("no_attn_layers", "no_mlp_layers", "long_window_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < L]
            if bad:
                _fail(f"model.{name}", getattr(self, name), f"layer indices must be in [0, {L})")
        if len(self.ve_layout) != L:
            _fail("model.ve_layout", self.ve_layout, f"needs one entry per layer ({L}), -1 for none")
        bad = [v for v in self.ve_layout if not -1 <= v < self.num_value_embeds]
        if bad:
            _fail("model.ve_layout", self.ve_layout,
                  f"entries must be -1 or a table index < num_value_embeds ({self.num_value_embeds})")
        if self.skip_mode == "single":
            if not 0 <= self.skip_from < self.skip_to < L:
                _fail("model.skip_from", (self.skip_from, self.skip_to),
                      f"need 0 ≤ skip_from < skip_to < num_layers ({L})")
        if not -1 <= self.backout_layer < L:
            _fail("model.backout_layer", self.backout_layer, f"must be -1 (off) or in [0, {L})")
        if self.gate_channels > self.model_dim:
            _fail("model.gate_channels", self.gate_channels, "must be ≤ model_dim")
        if self.logit_softcap <= 0 or self.softcap_div <= 0:
            _fail("model.logit_softcap", self.logit_softcap, "cap and divisor must be > 0")
        for name in ("fp8_x_scale", "fp8_w_scale", "fp8_grad_scale"):
            if getattr(self, name) < 0 or (name != "fp8_x_scale" and getattr(self, name) == 0):
                _fail(f"model.{name}", getattr(self, name), "must be > 0 (fp8_x_scale: 0 = √model_dim/448)")
        if self.yarn_attn_factor < 0:
            _fail("model.yarn_attn_factor", self.yarn_attn_factor, "must be ≥ 0 (0 keeps the scale fixed)")


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FamilyMults:
    """A multiplier per parameter family (lr_mul or wd_mul)."""

    attn: float = 1.0  # qkvo weights (NorMuon)
    mlp_up: float = 1.0  # c_fc (NorMuon)
    mlp_down: float = 2.0  # c_proj (NorMuon); 12-11's lr_mul is 2 ("corrective factor to account for transpose")
    attn_gate: float = 1.0  # per-layer attention gates (NorMuon)
    smear_gate: float = 1.0  # smear gate (NorMuon)
    embed: float = 75.0  # token embedding (Adam)
    value_embed: float = 75.0  # value-embedding tables (Adam)
    scalars: float = 5.0  # the packed scalars vector (Adam)
    head: float = 1.0  # lm_head (Adam)

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                _fail(f.name, getattr(self, f.name), "multipliers must be ≥ 0")


@dataclass(frozen=True, kw_only=True)
class VarianceNormConfig:
    """NorMuon's second-moment (variance) normalization, on or off per family."""

    attn: bool = True  # qkvo weights (Q, K, V and O blocks)
    mlp: bool = True  # mlp_up and mlp_down
    gates: bool = True  # attn_gate and smear_gate


Axis = Literal["output", "input", "shape"]


@dataclass(frozen=True, kw_only=True)
class OrientationConfig:
    """NorMuon's variance-normalization axis per family, on the layer's F.linear weight (out × in):
    "output" = one statistic per output unit (row), "input" = per input unit (column),
    "shape" = the 10-27 rule on the STORED matrix (per row iff rows ≥ cols). 12-11 = the defaults."""

    attn_qkv: Axis = "output"  # Q, K, V blocks of qkvo_w
    attn_o: Axis = "output"  # W_O block; "input" = per head dimension (the 12-11 README's corrected heads)
    mlp_up: Axis = "output"  # c_fc: "output" = per hidden unit
    mlp_down: Axis = "input"  # c_proj: "input" = per hidden unit
    attn_gate: Axis = "output"  # "output" = one statistic per head
    smear_gate: Axis = "output"  # "output" = one statistic for the whole 1×k gate


Optimizer = Literal["normuon", "adam"]


@dataclass(frozen=True, kw_only=True)
class FamilyOptimizer:
    """Which optimizer updates each hidden-matrix / gate family (embed, value_embed, scalars and
    head are always Adam). On Adam a family uses adam.lr · lr_mul[family] and wd_mul[family]."""

    attn: Optimizer = "normuon"  # qkvo weights
    mlp_up: Optimizer = "normuon"  # c_fc
    mlp_down: Optimizer = "normuon"  # c_proj
    attn_gate: Optimizer = "normuon"  # attention gates
    smear_gate: Optimizer = "normuon"  # smear gate (moved to Adam upstream from 2025-12-21)


@dataclass(frozen=True, kw_only=True)
class MuonConfig:
    lr: float = 0.023  # base LR of the hidden matrices and gates
    momentum_min: float = 0.85  # momentum at step 0 and at the end of training
    momentum_max: float = 0.95  # momentum after warmup
    momentum_warmup_steps: int = 300  # linear min → max over these steps
    momentum_cooldown_steps: int = 50  # linear max → min over the last steps
    beta2: float = 0.95  # EMA of the row/column mean-square of the orthogonalized update
    weight_decay: float = 1.2  # decay coefficient
    cautious_wd: bool = True  # decay only where sign(update) == sign(param) (12-11)
    wd_lr_scaled: bool = True  # decay = wd·lr·lr_eff (12-11); False: p·(1 − wd·wd_mul) (10-27)
    variance_norm: VarianceNormConfig = field(default_factory=VarianceNormConfig)  # NorMuon variance normalization on
    orientation: OrientationConfig = field(default_factory=OrientationConfig)  # normalization axis per family
    norm_fp32: bool = True  # mean-square in fp32 (12-11) or bf16 (10-27)
    second_moment_dtype: Literal["param", "fp32"] = "param"  # EMA buffer dtype: the param's (records: bf16 gates) or fp32
    tall_lr_rule: bool = True  # lr_eff = lr·max(1, rows/cols)^½ from the stored shape
    # Polar Express coefficient set (trainer/polar.py POLAR_SETS): the records' 5 steps, or 4/3-step
    # sets derived the same way (Amsel et al. 2025: ℓ=1e-3, safety 2e-2, cushion 0.02).
    polar_coeffs: Literal["record-5", "pe-4", "pe-3"] = "record-5"
    polar_backend: Literal["auto", "triton", "torch"] = "auto"  # Triton symmetric kernels on GPU
    custom_groups_8: bool = True  # the record's [1, 10, 16, 16] grouping when world_size == 8

    def __post_init__(self) -> None:
        if self.lr < 0:
            _fail("optim.muon.lr", self.lr, "must be ≥ 0")
        for n in ("momentum_min", "momentum_max", "beta2"):
            if not 0.0 <= getattr(self, n) < 1.0:
                _fail(f"optim.muon.{n}", getattr(self, n), "must be in [0, 1)")
        if self.momentum_warmup_steps < 0 or self.momentum_cooldown_steps < 0:
            _fail("optim.muon.momentum_warmup_steps", self.momentum_warmup_steps, "must be ≥ 0")


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    lr: float = 0.008  # base LR; per-family lr_mul multiplies it
    betas: tuple[float, float] = (0.65, 0.95)  # (β1, β2) of the moment EMAs
    eps: float = 1e-8  # added to √v before the bias correction (the records' placement)
    weight_decay: float = 0.0  # p ← p·(1 − lr·wd·wd_mul) before the update
    every_other_step: bool = True  # step Adam only on odd steps with two steps' gradients
    state_dtype: Dtype = "bf16"  # exp_avg / exp_avg_sq dtype (records: bf16)

    def __post_init__(self) -> None:
        if self.lr < 0:
            _fail("optim.adam.lr", self.lr, "must be ≥ 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("optim.adam.betas", self.betas, "each beta must be in [0, 1)")
        if self.eps <= 0:
            _fail("optim.adam.eps", self.eps, "must be > 0")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    muon: MuonConfig = field(default_factory=MuonConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)
    optimizer: FamilyOptimizer = field(default_factory=FamilyOptimizer)  # optimizer of the family
    lr_mul: FamilyMults = field(default_factory=FamilyMults)  # LR multiplier
    wd_mul: FamilyMults = field(  # weight-decay multiplier
        default_factory=lambda: FamilyMults(mlp_down=1.0, embed=1.0, value_embed=1.0, scalars=1.0))
    grad_reduction: Literal["mean", "sum"] = "mean"  # micro-batch losses averaged (12-11) or summed

    def normuon_families(self) -> tuple[str, ...]:
        """The families NorMuon updates; every other family is Adam's (optim.optimizer)."""
        return tuple(f for f in MUON_FAMILIES if getattr(self.optimizer, f) == "normuon")


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    num_scheduled_iterations: int = 2120  # length of the LR / window / batch schedules
    num_extension_iterations: int = 40  # extra steps at the final LR, window and batch
    cooldown_frac: float = 0.55  # fraction of scheduled steps in linear LR decay
    lr_final: float = 0.1  # LR multiplier at the end of cooldown
    lr_max_stages: tuple[float, ...] = (1.0, 1.51, 1.93)  # peak multiplier per stage
    lr_max_thresholds: tuple[float, ...] = (0.33, 0.66)  # x = step/N above which the next stage
    # 12-11: flat lr_final for step > N. 10-27: x clamped at 0.9999 (≈ 0.1002 in extension).
    lr_flat_extension: bool = True
    block_size: int = 128  # window unit in tokens
    ws_schedule: tuple[int, ...] = (3, 7, 11)  # long window (blocks) per equal part of the schedule
    short_window_ratio: float = 0.5  # short window = floor(long · ratio) blocks (records: long // 2)
    ws_final: int = 13  # long window during extension steps
    ws_validate: int = 20  # long window at the final validation (no extra YaRN step)
    # Global tokens per optimizer step per equal part of the schedule; int(len·step/N) picks it.
    train_bs_schedule: tuple[int, ...] = (131072, 262144, 393216)
    train_bs_extension: int = 393216  # global tokens per step during extension

    @property
    def num_iterations(self) -> int:
        return self.num_scheduled_iterations + self.num_extension_iterations

    def __post_init__(self) -> None:
        if self.num_scheduled_iterations < 1:
            _fail("schedule.num_scheduled_iterations", self.num_scheduled_iterations, "must be ≥ 1")
        if self.num_extension_iterations < 0:
            _fail("schedule.num_extension_iterations", self.num_extension_iterations, "must be ≥ 0")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            _fail("schedule.cooldown_frac", self.cooldown_frac, "must be in [0, 1]")
        if len(self.lr_max_stages) != len(self.lr_max_thresholds) + 1:
            _fail("schedule.lr_max_stages", self.lr_max_stages,
                  f"needs exactly one more entry than lr_max_thresholds ({len(self.lr_max_thresholds)})")
        if list(self.lr_max_thresholds) != sorted(self.lr_max_thresholds):
            _fail("schedule.lr_max_thresholds", self.lr_max_thresholds, "must be increasing")
        if not self.ws_schedule or any(w < 1 for w in self.ws_schedule):
            _fail("schedule.ws_schedule", self.ws_schedule, "a non-empty list of window sizes ≥ 1 (in blocks)")
        if not 0.0 < self.short_window_ratio <= 1.0:
            _fail("schedule.short_window_ratio", self.short_window_ratio, "must be in (0, 1]")
        if min(self.ws_final, self.ws_validate, self.block_size) < 1:
            _fail("schedule.ws_final", self.ws_final, "windows and block_size must be ≥ 1")
        if not self.train_bs_schedule or min(self.train_bs_schedule) < 1 or self.train_bs_extension < 1:
            _fail("schedule.train_bs_schedule", self.train_bs_schedule, "a non-empty list of token counts ≥ 1")


# --------------------------------------------------------------------------------------------
# Data, evaluation, runtime
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Learnable synthetic shards (Zipf unigram + Markov bigram structure, BOS-separated docs)."""

    train_tokens: int = 200_000_000  # training tokens generated (in shards of shard_tokens)
    val_tokens: int = 10_485_760  # validation targets generated (the val shard holds one more token)
    seed: int = 1234  # data seed, independent of the run seed
    mean_doc_len: int = 600  # mean document length in tokens (geometric-ish distribution)
    zipf_a: float = 1.1  # Zipf exponent of the unigram distribution
    shard_tokens: int = 100_000_000  # tokens per train shard (upstream shards hold 100M)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    data_dir: str = "data/fineweb10B"  # directory holding the shards (relative → cwd)
    train_pattern: str = "fineweb_train_*.bin"  # training shard file names in data_dir
    val_pattern: str = "fineweb_val_*.bin"  # validation shard file names in data_dir
    synthetic: bool = False  # generate `synth` shards into data_dir when none exist
    # "file": documents in file order, the same stream for every seed (upstream); "shuffled": the
    # seed also permutes the documents within each shard.
    order: Literal["file", "shuffled"] = "file"
    synth: SynthConfig = field(default_factory=SynthConfig)  # synthetic data
    bos_id: int = 50256  # documents start with this token
    train_max_seq_len: int = 2048  # documents cut at this many tokens
    align_bos: bool = True  # training sequences start at a BOS token

    def __post_init__(self) -> None:
        if self.train_max_seq_len < 2:
            _fail("data.train_max_seq_len", self.train_max_seq_len, "must be ≥ 2")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    val_tokens: int = 10_485_760  # fixed validation set size
    val_batch_size: int = 2_097_152  # global tokens per validation step
    val_loss_every: int = 250  # also at step 0 and the last step; 0 = only at the end

    def __post_init__(self) -> None:
        if self.val_batch_size < 1 or self.val_tokens < self.val_batch_size:
            _fail("eval.val_tokens", self.val_tokens, f"must be ≥ val_batch_size ({self.val_batch_size})")
        if self.val_loss_every < 0:
            _fail("eval.val_loss_every", self.val_loss_every, "must be ≥ 0")


@dataclass(frozen=True, kw_only=True)
class DebugConfig:
    fail_at_step: int = -1  # raise a RuntimeError at this step (testing retries); -1 = never
    exit_code: int = 1  # exit status used by fail_at_step


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: cuda if available
    compile: bool = True  # torch.compile the model (GPU only; ignored on CPU)
    warmup: bool = True  # compile every (window, batch) stage before the timer starts
    warmup_steps_per_stage: int = 10  # steps per stage in the warmup
    reference_world_size: int = 8  # grad accumulation = reference_world_size / world_size
    log_every: int = 1  # `step` events every k steps
    # replay each micro-batch's forward + backward as a CUDA graph (GPU, compiled, fa4/flex):
    # the same kernels without the host's launch overhead (trainer/graphs.py)
    cuda_graphs: bool = True
    inductor_cache_dir: str = ""  # TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR root; "" = torch default

    def __post_init__(self) -> None:
        if self.reference_world_size not in (1, 2, 4, 8):
            _fail("runtime.reference_world_size", self.reference_world_size, "must be 1, 2, 4 or 8")
        if self.log_every < 1:
            _fail("runtime.log_every", self.log_every, "must be ≥ 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    preset: str = "speedrun"  # the preset this config started from (informational)
    seed: int = 0  # run seed: initialization (and document order when data.order = shuffled)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        if self.data.bos_id >= self.model.vocab_size:
            _fail("data.bos_id", self.data.bos_id, f"must be < model.vocab_size ({self.model.vocab_size})")
        if self.data.synthetic and self.data.synth.train_tokens < max(self.schedule.train_bs_schedule):
            _fail("data.synth.train_tokens", self.data.synth.train_tokens,
                  "must hold at least one global batch")


# --------------------------------------------------------------------------------------------
# Dict conversion, dotted overrides, hashing
# --------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), JSON-serialisable."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


# Fields that never change what a run computes: left out of the hash so that resume and
# comparisons hold across nodes with different cache locations.
HASH_EXCLUDED = ("runtime.inductor_cache_dir", "runtime.log_every")
# Fields added after stores of runs existed, left out of the hash while at these values, so that a
# run stored before the field existed keeps its hash (its experiment resumes instead of rerunning
# everything); any other value enters the hash. runtime.cuda_graphs: the same kernels, replayed
# (trainer/graphs.py), like any other speed-up of the trainer's code (git_commit in the row says which);
# model.fused_qk_rotary: the same arithmetic in one kernel, rounded at other points (bf16 noise,
# bounded by tests/trainer/test_qk_rotary.py), like cuda_graphs a speed-up of the trainer's code.
# model.fused_relu2: off is the path every stored run took. model.fused_qkv: the same bits either way.
HASH_NEUTRAL = {"runtime.cuda_graphs": True, "model.fused_qk_rotary": True, "model.fused_relu2": False,
                "model.fused_qkv": False}


def config_hash(cfg: TrainConfig) -> str:
    """Stable 12-hex hash of the resolved config (seed, preset label and HASH_EXCLUDED left out)."""
    d = to_dict(cfg)
    d.pop("seed", None)
    d.pop("preset", None)
    for key in HASH_EXCLUDED:
        section, leaf = key.split(".")
        d[section].pop(leaf, None)
    for key, neutral in HASH_NEUTRAL.items():
        section, leaf = key.split(".")
        if d[section].get(leaf) == neutral:
            d[section].pop(leaf)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the tree, e.g. 'optim.muon.lr'."""
    keys: list[str] = []
    hints = _hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if isinstance(t, type) and is_dataclass(t):
            keys.extend(valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) → the field's comment in this file: the trailing `# ...` of its
    line, else the comment lines right above it. The comments are the one place a knob is explained."""
    import ast
    import io
    import tokenize

    src = open(__file__, encoding="utf-8").read()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(src).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            text = comments.get(item.lineno) or comments.get(item.end_lineno or item.lineno)
            if not text:
                above, n = [], item.lineno - 1
                while n >= 1 and lines[n - 1].strip().startswith("#"):
                    above.insert(0, comments.get(n, ""))
                    n -= 1
                text = " ".join(above)
            out[(node.name, item.target.id)] = text
    return out


def _type_name(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(t, "__name__", str(t))


def describe_keys(cfg: "TrainConfig | None" = None) -> list[dict[str, Any]]:
    """Every dotted key with its type, its value in `cfg` (default: TrainConfig()) and a one-line
    meaning, e.g. {"key": "optim.muon.lr", "type": "float", "default": 0.023, "meaning": "..."}.
    A nested field's meaning is prefixed by its parent's comment ("LR multiplier: qkvo weights")."""
    cfg = TrainConfig() if cfg is None else cfg
    notes = _field_comments()
    rows: list[dict[str, Any]] = []

    def walk(obj: Any, prefix: str, parent_note: str) -> None:
        hints = _hints(type(obj))
        for f in fields(obj):
            v = getattr(obj, f.name)
            note = notes.get((type(obj).__name__, f.name), "")
            if is_dataclass(v):
                walk(v, f"{prefix}{f.name}.", note)
                continue
            rows.append({"key": f"{prefix}{f.name}", "type": _type_name(hints[f.name]),
                         "default": list(v) if isinstance(v, tuple) else v,
                         "meaning": f"{parent_note}: {note}" if parent_note and note else (note or parent_note)})

    walk(cfg, "", "")
    return rows


def _near(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=4, cutoff=0.5)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last][:4]
        close = close or difflib.get_close_matches(last, [c.rsplit(".", 1)[-1] for c in candidates], n=4)
    return ", ".join(close) if close else "(none close; see `python -m trainer.train --list-keys`)"


def _coerce(key: str, value: Any, t: Any) -> Any:
    """Check / convert one leaf value to annotated type t; ConfigError naming key on mismatch."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if t is bool:
        if isinstance(value, bool):
            return value
        _fail(key, value, "expected true or false")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(key, value, "expected an integer")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "expected a number")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            _fail(key, value, "expected a string")
        return value
    if origin is Literal:
        if value not in args:
            _fail(key, value, f"expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            _fail(key, value, "expected a list, e.g. [3, 7, 11]")
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            _fail(key, value, f"expected a list of exactly {len(args)} values")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    raise TypeError(f"unsupported config type {t!r} for {key}")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested override mapping → flat dotted keys ({'optim': {'muon': {'lr': 1}}} → {'optim.muon.lr': 1})."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Raise one ConfigError listing every unknown key (with close matches) or bad type."""
    apply_overrides(TrainConfig(), overrides)


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Return cfg with dotted (or nested-dict) overrides applied; validated.

    Unknown keys and type errors are collected into a single ConfigError."""
    flat = flatten(overrides)
    keys = valid_keys()
    problems: list[str] = []
    by_section: dict[tuple[str, ...], dict[str, Any]] = {}
    for key, value in flat.items():
        if key not in keys:
            problems.append(f"unknown config key {key!r}; did you mean: {_near(key, keys)}")
            continue
        path = tuple(key.split("."))
        by_section.setdefault(path[:-1], {})[path[-1]] = value
    if problems:
        raise ConfigError("\n".join(problems))

    def rebuild(obj: Any, path: tuple[str, ...]) -> Any:
        hints = _hints(type(obj))
        changes: dict[str, Any] = {}
        for f in fields(obj):
            sub = path + (f.name,)
            cur = getattr(obj, f.name)
            if is_dataclass(cur):
                if any(p[: len(sub)] == sub for p in by_section):
                    changes[f.name] = rebuild(cur, sub)
            elif path in by_section and f.name in by_section[path]:
                key = ".".join(sub)
                try:
                    changes[f.name] = _coerce(key, by_section[path][f.name], hints[f.name])
                except ConfigError as e:
                    problems.append(str(e))
        if problems:
            return obj
        return dataclasses.replace(obj, **changes) if changes else obj

    try:
        out = rebuild(cfg, ())
    except ConfigError as e:  # a __post_init__ check on the combined values
        raise ConfigError(str(e)) from None
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a nested dict such as the `start` event's config."""
    return apply_overrides(TrainConfig(), d)


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings; values are YAML (numbers, true/false, [3, 7, 11], strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is invalid: expected key=value, e.g. optim.muon.lr=0.03")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return out

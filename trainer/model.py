"""The speedrun GPT (trainer-spec §1a/§1b), every behaviour driven by a ModelConfig.

    from trainer.model import GPT
    model = GPT(cfg.model, world_size=2)
    loss = model(inputs, targets, docs, long_window=384, short_window=128)   # windows in tokens
    model.param_families()   # [(family, parameter)] for NorMuon / DistAdam
    python -m pytest tests/trainer/test_model.py -q

Shapes: a forward takes ONE flat packed sequence (T,) of token ids, its next-token targets and
document ids (docs[t] increments at each BOS). Training mode returns the sum-reduced
cross-entropy over bf16 logits (FP8 lm_head when `model.fp8` is set); eval mode the mean over
fp32 logits.

Layout of the `scalars` vector (L layers): [0:L] skip gate logits, [L:3L] block lambdas (λa, λb)
per layer, [3L:5L] attention lambdas (λ0, λ1) per layer, [5L] smear λ, [5L+1] backout λ, then
zero padding to a multiple of world_size (so DistAdam can shard it).

Empty blocks (no attention and no MLP) are identities: their lambdas are not applied and they do
not take part in the U-net stack; the single skip and the backout still read/write at their index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer import head_ce, mlp_relu2, qk_rotary
from trainer.attention import Rotary, apply_rotary, attend, build_mask
from trainer.config import ModelConfig

FP8_MAX_E4M3 = 448.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.param_dtype / model.rope_dtype values
ACTIVATIONS = {  # model.mlp_activation
    "relu2": lambda h: F.relu(h).square(),  # both records
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def fp8_supported(device: torch.device) -> bool:
    """torch._scaled_mm with float8 needs a CUDA GPU of compute capability ≥ 8.9 (Ada/Hopper+)."""
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm"))


class _FP8Linear(torch.autograd.Function):
    """y = x @ wᵀ with e4m3 x and w (per-tensor scales x_s, w_s) and e5m2 output gradient (g_s)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, x_s: float, w_s: float, g_s: float) -> Tensor:
        x = x.contiguous()
        x_f8 = x.div(x_s).to(torch.float8_e4m3fn)
        w_f8 = w.div(w_s).to(torch.float8_e4m3fn)
        one = torch.ones((), device=x.device, dtype=torch.float32)
        out = torch._scaled_mm(x_f8, w_f8.t(), out_dtype=torch.bfloat16, scale_a=one * x_s,
                               scale_b=one * w_s, use_fast_accum=True)
        ctx.save_for_backward(x_f8, w_f8)
        ctx.scales, ctx.w_dtype = (x_s, w_s, g_s), w.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_f8, w_f8 = ctx.saved_tensors
        x_s, w_s, g_s = ctx.scales
        one = torch.ones((), device=grad.device, dtype=torch.float32)
        g_f8 = grad.contiguous().div(g_s).to(torch.float8_e5m2)
        grad_x = torch._scaled_mm(g_f8, w_f8.t().contiguous().t(), out_dtype=torch.bfloat16,
                                  scale_a=one * g_s, scale_b=one * w_s, use_fast_accum=False)
        grad_w = torch._scaled_mm(x_f8.t().contiguous(), g_f8.t().contiguous().t(), out_dtype=torch.float32,
                                  scale_a=one * x_s, scale_b=one * g_s, use_fast_accum=False).t()
        return grad_x, grad_w.to(ctx.w_dtype), None, None, None


class Attention(nn.Module):
    def __init__(self, m: ModelConfig, layer: int) -> None:
        super().__init__()
        d = m.model_dim
        self.d, self.h, self.hd, self.gc = d, m.num_heads, m.head_dim, m.gate_channels
        self.premul_o = m.premul_o
        self.qk_norm = m.qk_norm
        self.fused_qk_rotary = m.fused_qk_rotary
        self.fused_qkv = m.fused_qkv and m.fused_qk_rotary and m.premul_o
        self.long = layer in m.long_window_layers
        # Stored (4d, d) "tall" or (d, 4d) "wide"; its memory viewed as (4, d, d) is Q, K, V, O (out×in).
        qkvo = torch.empty((4 * d, d) if m.weight_layout == "tall" else (d, 4 * d))
        bound = 3 ** 0.5 * m.init_scale * d ** -0.5
        with torch.no_grad():
            w = qkvo.view(4, d, d)
            w[:3].uniform_(-bound, bound)  # drawn in fp32, then stored in model.param_dtype.attn
            w[3].zero_()
        self.qkvo_w = nn.Parameter(qkvo.to(DTYPES[m.param_dtype.attn]))
        self.gate = None
        if m.attn_gate:
            self.gate = nn.Parameter(torch.zeros(m.num_heads, m.gate_channels, dtype=DTYPES[m.param_dtype.attn_gate]))

    def forward(self, x: Tensor, ve: Tensor | None, lam: Tensor, cos: Tensor, sin: Tensor, mask,
                backend: str, scale: tuple[Tensor | None, float | Tensor]) -> Tensor:
        """scale = (q multiplier or None, the softmax scale applied inside the kernel)."""
        T, d, h, hd = x.size(0), self.d, self.h, self.hd
        w = self.qkvo_w.view(4, d, d)
        w_qkv, w_o = w[:3].reshape(3 * d, d), w[3]
        if self.premul_o:  # 12-11: λ0 scales the QKV weight, λ1 scales W_O, ve added unscaled
            w_qkv, w_o = lam[0] * w_qkv, lam[1] * w_o
        qkv = F.linear(x, w_qkv.type_as(x)).view(T, 3, h, hd)
        if ve is not None:  # in v's dtype (the value tables may be stored in another: model.param_dtype)
            ve = ve.view(T, h, hd).type_as(qkv)
        fused = self.qk_norm and self.fused_qk_rotary and qk_rotary.fits(hd) and qk_rotary.usable(qkv)
        if fused and self.fused_qkv:  # q/k norm + rotary and v (+ ve) in one op; its backward writes d(qkv)
            q, k, v = qk_rotary.qkv_norm_rotary(qkv, ve, cos, sin)
            ve = None  # added
        else:
            q, k, v = qkv.unbind(1)
            if fused:
                q, k = qk_rotary.norm_rotary(q, k, cos, sin)  # one Triton kernel each way (trainer/qk_rotary.py)
            else:
                if self.qk_norm:
                    q, k = rms_norm(q), rms_norm(k)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.premul_o:
            if ve is not None:
                v = v + ve.view(T, h, hd)
        else:  # 10-27: v = λ0·v + λ1·ve
            v = lam[0] * v + lam[1] * ve.view(T, h, hd) if ve is not None else lam[0] * v
        q_mul, kernel_scale = scale
        if q_mul is not None:  # model.scale_in_kernel=false: q pre-multiplied in its own dtype
            q = q * q_mul.to(q.dtype)
        y = attend(q, k, v, mask, backend, kernel_scale)
        if self.gate is not None:
            y = y * torch.sigmoid(F.linear(x[:, :self.gc], self.gate.type_as(x))).view(T, h, 1)
        return F.linear(y.reshape(T, d), w_o.type_as(y))


class MLP(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        d, hid = m.model_dim, m.hidden_dim
        self.tall = m.weight_layout == "tall"
        shape = (hid, d) if self.tall else (d, hid)
        fc = torch.empty(shape)
        bound = 3 ** 0.5 * m.init_scale * d ** -0.5
        with torch.no_grad():
            fc.uniform_(-bound, bound)  # drawn in fp32, then stored in model.param_dtype.mlp_up
        self.c_fc = nn.Parameter(fc.to(DTYPES[m.param_dtype.mlp_up]))
        self.c_proj = nn.Parameter(torch.zeros(shape, dtype=DTYPES[m.param_dtype.mlp_down]))
        self.act = ACTIVATIONS[m.mlp_activation]
        self.fused_relu2 = m.fused_relu2 and m.mlp_activation == "relu2"

    def forward(self, x: Tensor) -> Tensor:
        fc, proj = self.c_fc.type_as(x), self.c_proj.type_as(x)
        if self.fused_relu2 and mlp_relu2.usable(x):  # relu² in the matmuls' epilogues (trainer/mlp_relu2.py)
            return mlp_relu2.mlp_relu2(x, fc, proj, self.tall)
        if self.tall:  # (4d, d): linear(x, c_fc), linear(h, c_projᵀ)
            return F.linear(self.act(F.linear(x, fc)), proj.t())
        return F.linear(self.act(F.linear(x, fc.t())), proj)  # (d, 4d)


class Block(nn.Module):
    def __init__(self, m: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn = Attention(m, layer) if layer not in m.no_attn_layers else None
        self.mlp = MLP(m) if layer not in m.no_mlp_layers else None

    @property
    def empty(self) -> bool:
        return self.attn is None and self.mlp is None

    def forward(self, x: Tensor, x0: Tensor, lam: Tensor, sa: Tensor, ve: Tensor | None, cos: Tensor,
                sin: Tensor, masks: dict, backend: str, scale: tuple) -> Tensor:
        x = lam[0] * x + lam[1] * x0
        if self.attn is not None:
            mask = masks["long" if self.attn.long else "short"]
            x = x + self.attn(rms_norm(x), ve, sa, cos, sin, mask, backend, scale)
        if self.mlp is not None:
            x = x + self.mlp(rms_norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, m: ModelConfig, world_size: int = 1) -> None:
        super().__init__()
        self.cfg = m
        V, d, L = m.padded_vocab, m.model_dim, m.num_layers
        dt = m.param_dtype
        self.embed = nn.Embedding(V, d).to(DTYPES[dt.embed])
        self.value_embeds = nn.ModuleList(nn.Embedding(V, d).to(DTYPES[dt.value_embed])
                                          for _ in range(m.num_value_embeds))
        self.smear_gate = None
        if m.smear_gate:
            self.smear_gate = nn.Parameter(torch.zeros(1, m.gate_channels, dtype=DTYPES[dt.smear_gate]))
        self.blocks = nn.ModuleList(Block(m, i) for i in range(L))
        self.lm_head = nn.Parameter(torch.zeros(V, d, dtype=DTYPES[dt.head]))
        n = 5 * L + 2
        scalars = torch.zeros(n + (-n) % world_size)
        scalars[:L] = m.skip_init
        scalars[L:3 * L] = torch.tensor(m.block_lambdas_init).repeat(L)
        scalars[3 * L:5 * L] = torch.tensor(m.sa_lambdas_init).repeat(L)
        scalars[5 * L] = 0.0  # smear λ: smear starts off
        scalars[5 * L + 1] = m.backout_init
        self.scalars = nn.Parameter(scalars.to(DTYPES[dt.scalars]))
        self.rotary = Rotary(m.head_dim, m.rope_freqs, m.rope_min_freq, m.attn_scale_init,
                             m.yarn_alpha, m.yarn_beta, m.yarn_attn_factor, DTYPES[m.rope_dtype])
        self.fp8 = False  # set by the trainer where fp8_supported(device) and model.fp8_head
        # x_s, w_s, grad_s; the records' x_s = √d/448 (model.fp8_x_scale = 0)
        self.fp8_scales = (m.fp8_x_scale or d ** 0.5 / FP8_MAX_E4M3, m.fp8_w_scale, m.fp8_grad_scale)

    def param_families(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter exactly once, labelled with its optimizer family."""
        out: list[tuple[str, nn.Parameter]] = [("embed", self.embed.weight)]
        out += [("value_embed", ve.weight) for ve in self.value_embeds]
        if self.smear_gate is not None:
            out.append(("smear_gate", self.smear_gate))
        for b in self.blocks:
            if b.attn is not None:
                out.append(("attn", b.attn.qkvo_w))
                if b.attn.gate is not None:
                    out.append(("attn_gate", b.attn.gate))
            if b.mlp is not None:
                out += [("mlp_up", b.mlp.c_fc), ("mlp_down", b.mlp.c_proj)]
        out += [("scalars", self.scalars), ("head", self.lm_head)]
        return out

    def forward(self, inputs: Tensor, targets: Tensor, docs: Tensor | None, long_window: int | Tensor,
                short_window: int | Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0) -> Tensor:
        """Loss of one flat micro-batch. Windows in tokens; on the flex path they may be 0-d device
        int tensors and on the fa4 path 0-d CPU tensors (the trainer passes them so), so a window
        change reuses the compiled graph. `docs` (document id per position) serves flex and sdpa;
        fa4 takes `cu_seqlens` (boundaries, padded with T) and `max_seqlen` (a bound on every
        document's length) instead — trainer.feed builds all three."""
        m = self.cfg
        L, T = m.num_layers, inputs.numel()
        sc = self.scalars
        skip_w, lams, sas = sc[:L], sc[L:3 * L].view(L, 2), sc[3 * L:5 * L].view(L, 2)
        smear_lambda, backout_lambda = sc[5 * L], sc[5 * L + 1]

        x = self.embed(inputs)
        used = sorted({i for i in m.ve_layout if i >= 0})
        ves = {i: self.value_embeds[i](inputs) for i in used}
        if self.smear_gate is not None:  # on the flat stream, so it crosses document boundaries
            gate = torch.sigmoid(F.linear(x[1:, :m.gate_channels], self.smear_gate.type_as(x)))
            x = torch.cat([x[:1], x[1:] + smear_lambda * gate * x[:-1]])
        x = x0 = rms_norm(x)

        cos, sin = self.rotary.cos_sin(T, inputs.device)
        backend = m.attn_backend
        rot = self.rotary
        if not m.scale_in_kernel:
            scale = (rot.attn_scale_t, 1.0)
        elif backend == "fa4":
            scale = (None, rot.attn_scale_host)
        elif backend == "flex":
            scale = (None, rot.attn_scale_t)
        else:  # sdpa takes a Python number (it recompiles per window anyway)
            scale = (None, rot.attn_scale)
        masks = {"long": build_mask(docs, long_window, backend, cu_seqlens, max_seqlen)}
        same = isinstance(short_window, int) and isinstance(long_window, int) and short_window == long_window
        masks["short"] = masks["long"] if same else build_mask(docs, short_window, backend, cu_seqlens, max_seqlen)

        stack: list[Tensor] = []
        half = L // 2
        skip_saved = x_back = None
        for i, block in enumerate(self.blocks):
            if m.skip_mode == "single" and i == m.skip_to and skip_saved is not None:
                x = x + torch.sigmoid(skip_w[1]) * skip_saved
            if not block.empty:
                if m.skip_mode == "unet" and i >= half and stack:
                    x = x + torch.sigmoid(skip_w[i - half]) * stack.pop()
                ve = ves.get(m.ve_layout[i]) if m.ve_layout[i] >= 0 else None
                x = block(x, x0, lams[i], sas[i], ve, cos, sin, masks, backend, scale)
                if m.skip_mode == "unet" and i < half:
                    stack.append(x)
            if m.skip_mode == "single" and i == m.skip_from:
                skip_saved = x
            if i == m.backout_layer:
                x_back = x
        if x_back is not None:
            x = x - backout_lambda * x_back
        x = rms_norm(x)

        if self.training:
            if self.fp8 and m.fused_head_ce and x.is_cuda and head_ce.available():
                return head_ce.fp8_head_ce(x, self.lm_head, targets, self.fp8_scales, m.logit_softcap, m.softcap_div)
            if self.fp8:
                logits = _FP8Linear.apply(x, self.lm_head, *self.fp8_scales)
            else:
                logits = F.linear(x, self.lm_head.type_as(x))
            logits = m.logit_softcap * torch.sigmoid(logits / m.softcap_div)
            return F.cross_entropy(logits, targets, reduction="sum")
        logits = F.linear(x, self.lm_head.type_as(x)).float()
        logits = m.logit_softcap * torch.sigmoid(logits / m.softcap_div)
        return F.cross_entropy(logits, targets, reduction="mean")


__all__ = ["GPT", "fp8_supported", "rms_norm"]

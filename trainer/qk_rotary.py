"""q/k RMS-norm + rotary in one Triton kernel per direction (model.fused_qk_rotary, on by default).

    from trainer.qk_rotary import norm_rotary
    q, k = norm_rotary(q, k, cos, sin)    # (T, H, D) views of the QKV output → contiguous (T, H, D)
    python -m pytest tests/trainer/test_qk_rotary.py -q     # CPU: Triton's interpreter; GPU: the kernels

What it computes is the model's `rms_norm` then `apply_rotary` of q and k (eps = F.rms_norm's default,
the machine epsilon of its fp32 compute type; dims i and i + D/2 rotate together by the cos/sin tables),
in fp32 from the bf16 inputs with one rounding at the end — as Inductor's fused kernels do, so it
differs from the unfused path by bf16 rounding only. Why: on the speedrun preset at 393k tokens
Inductor's kernels for this took 31.8 ms per step at ~1.9 TB/s (docs/performance.md, session 6);
a kernel that reads q, k once and writes them once should run near the memory's rate. Timed on an
H200 (session 7): 609.2 → 599.9 ms per step at 393k tokens, 216.0 → 214.2 at 131k; on since.
Head sizes with head_dim/2 not a power of two (`fits`) and CPU runs take the unfused ops.
`qkv_norm_rotary` (model.fused_qkv, off until timed) is the same op taking the whole (T, 3, H, D) QKV
product and passing v (+ the value embedding) through, so that its backward writes d(qkv) in one pass.

forward: per program BLOCK_T tokens × all heads of q and of k: sum of squares per (token, head),
r = rsqrt(mean + eps), y = x·r, out = (y1·cos + y2·sin, y2·cos − y1·sin); r is kept (T, 2, H).
backward: the rotation transposed, dy = (do1·cos − do2·sin, do1·sin + do2·cos), then
dx = r·dy − x·r³·mean(dy·x).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it (then this path is off)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines without triton
    triton = None


if triton is not None:
    from trainer.head_ce import _bf16  # x rounded to the nearest bf16, as fp32 (native or bit arithmetic)

    @triton.jit
    def _tile(cos, sin, s_ct, T, H: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's tokens t, heads h, their broadcastable (token, head, dim) indices, the mask
        and the tokens' cos/sin rows (fp32)."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.arange(0, HP)
        tt, hh, cc = t[:, None, None].to(tl.int64), h[None, :, None], tl.arange(0, HALF)[None, None, :]
        cs = tl.load(cos + tt * s_ct + cc, mask=tt < T, other=0.0).to(tl.float32)
        sn = tl.load(sin + tt * s_ct + cc, mask=tt < T, other=0.0).to(tl.float32)
        return t, h, tt, hh, cc, (tt < T) & (hh < H), cs, sn

    @triton.jit
    def _halves(ptr, offs, mask, HALF: tl.constexpr):
        """The two rotary halves (dims i and i + D/2) at `offs`, in fp32."""
        lo = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return lo, tl.load(ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _fwd_kernel(q, k, v, ve, cos, sin, out_q, out_k, out_v, rstd, T, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_et, s_eh,
                    s_ct, eps, V_MODE: tl.constexpr, BIT_ROUND: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                    HALF: tl.constexpr, BLOCK_T: tl.constexpr):
        """V_MODE 0: q and k only; 1: also out_v = v; 2: out_v = v + ve (the sum in fp32 rounded once,
        as PyTorch adds bf16 tensors). BIT_ROUND: round that sum to bf16 by bit arithmetic (Triton's
        interpreter truncates .to(bf16); the same bits as the GPU's conversion)."""
        t, h, tt, hh, cc, mask, cs, sn = _tile(cos, sin, s_ct, T, H, HP, HALF, BLOCK_T)
        out = tt * (H * 2 * HALF) + hh * (2 * HALF) + cc  # (T, H, D) contiguous outputs
        r_offs = t[:, None].to(tl.int64) * (2 * H) + h[None, :]
        for which in tl.static_range(2):  # q, then k
            src = q if which == 0 else k
            st = s_qt if which == 0 else s_kt
            sh = s_qh if which == 0 else s_kh
            dst = out_q if which == 0 else out_k
            x1, x2 = _halves(src, tt * st + hh * sh + cc, mask, HALF)
            r = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF) + eps)
            y1, y2 = x1 * r[:, :, None], x2 * r[:, :, None]
            tl.store(dst + out, (y1 * cs + y2 * sn).to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + out + HALF, (y2 * cs - y1 * sn).to(dst.dtype.element_ty), mask=mask)
            tl.store(rstd + r_offs + which * H, r, mask=(t[:, None] < T) & (h[None, :] < H))
        if V_MODE > 0:
            for part in tl.static_range(2):  # the two halves of each head, like q and k
                vv = tl.load(v + tt * s_vt + hh * s_vh + cc + part * HALF, mask=mask, other=0.0)
                if V_MODE == 2:
                    e = tl.load(ve + tt * s_et + hh * s_eh + cc + part * HALF, mask=mask, other=0.0)
                    vv = vv.to(tl.float32) + e.to(tl.float32)
                    if BIT_ROUND:
                        vv = _bf16(vv, False)
                tl.store(out_v + out + part * HALF, vv.to(out_v.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(q, k, dout_q, dout_k, dout_v, cos, sin, rstd, dq, dk, dv, T, s_qt, s_qh, s_kt, s_kh, s_ct, s_ot,
                    COPY_V: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr,
                    BLOCK_T: tl.constexpr):
        """dq, dk (and with COPY_V dv = dout_v) at rows of stride s_ot: H·D for separate (T, H, D)
        gradients, 3·H·D for slots of one (T, 3, H, D) gradient of the QKV product."""
        t, h, tt, hh, cc, mask, cs, sn = _tile(cos, sin, s_ct, T, H, HP, HALF, BLOCK_T)
        g = tt * (H * 2 * HALF) + hh * (2 * HALF) + cc  # (T, H, D) contiguous incoming gradients
        o = tt * s_ot + hh * (2 * HALF) + cc  # where the outgoing ones go
        r_offs = t[:, None].to(tl.int64) * (2 * H) + h[None, :]
        for which in tl.static_range(2):  # q, then k
            src = q if which == 0 else k
            st = s_qt if which == 0 else s_kt
            sh = s_qh if which == 0 else s_kh
            dout = dout_q if which == 0 else dout_k
            dst = dq if which == 0 else dk
            x1, x2 = _halves(src, tt * st + hh * sh + cc, mask, HALF)
            do1, do2 = _halves(dout, g, mask, HALF)
            r = tl.load(rstd + r_offs + which * H, mask=(t[:, None] < T) & (h[None, :] < H), other=0.0)
            dy1 = do1 * cs - do2 * sn  # the rotation transposed
            dy2 = do1 * sn + do2 * cs
            dot = (tl.sum(dy1 * x1, axis=2) + tl.sum(dy2 * x2, axis=2)) / (2 * HALF)
            r3, rr = (r * r * r * dot)[:, :, None], r[:, :, None]
            tl.store(dst + o, (rr * dy1 - x1 * r3).to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + o + HALF, (rr * dy2 - x2 * r3).to(dst.dtype.element_ty), mask=mask)
        if COPY_V:
            for part in tl.static_range(2):
                tl.store(dv + o + part * HALF, tl.load(dout_v + g + part * HALF, mask=mask, other=0.0), mask=mask)


BLOCK_T = 4  # tokens per program: 4 × 8 (padded) heads × 64-wide halves, about six such tiles live in the backward


def available() -> bool:
    """Whether Triton imports (the kernels' compiler; CPU-only torch installs may lack it)."""
    return triton is not None


def usable(t: Tensor) -> bool:
    """Whether the kernels can run on `t`'s device: a CUDA tensor, or any under TRITON_INTERPRET=1
    (Triton's interpreter, which the CPU tests use)."""
    return available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def fits(head_dim: int) -> bool:
    """Whether the kernels take this head size: head_dim/2 a power of two (one tile of lanes per half).
    The model runs the unfused ops for any other."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half > 0 and half & (half - 1) == 0


def _check(q: Tensor, k: Tensor, cos: Tensor) -> tuple[int, int, int]:
    T, H, D = q.shape
    if k.shape != q.shape or q.stride(2) != 1 or k.stride(2) != 1 or cos.shape[0] < T or 2 * cos.shape[-1] != D:
        raise ValueError(f"norm_rotary: q {tuple(q.shape)} / k {tuple(k.shape)} with unit last stride and cos/sin "
                         f"of ≥ T rows × D/2 expected; got cos {tuple(cos.shape)}")
    return T, H, D


@torch.library.custom_op("trainer::qk_norm_rotary_fwd", mutates_args=())
def qk_norm_rotary_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(q_out, k_out, rstd): contiguous (T, H, D) outputs in q's dtype and rstd (T, 2, H) fp32."""
    T, H, D = _check(q, k, cos)
    out_q = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
    out_k = torch.empty((T, H, D), device=k.device, dtype=k.dtype)
    rstd = torch.empty((T, 2, H), device=q.device, dtype=torch.float32)
    _fwd(q, k, None, None, cos, sin, out_q, out_k, None, rstd, eps)
    return out_q, out_k, rstd


def _fwd(q, k, v, ve, cos, sin, out_q, out_k, out_v, rstd, eps) -> None:
    T, H, D = q.shape
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    mode = 0 if v is None else 1 if ve is None else 2
    v_, ve_ = (q if v is None else v), (q if ve is None else ve)  # unused pointers where mode says so
    _fwd_kernel[(triton.cdiv(T, BLOCK_T),)](q, k, v_, ve_, cos2, sin2, out_q, out_k, out_q if out_v is None else out_v,
                                            rstd, T, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                            v_.stride(0), v_.stride(1), ve_.stride(0), ve_.stride(1), cos2.stride(0),
                                            eps, V_MODE=mode, BIT_ROUND=bool(mode == 2 and q.dtype == torch.bfloat16
                                                                             and not q.is_cuda),
                                            H=H, HP=triton.next_power_of_2(H), HALF=D // 2, BLOCK_T=BLOCK_T,
                                            num_warps=4)


def _bwd(q, k, dout_q, dout_k, dout_v, cos, sin, rstd, dq, dk, dv, row_stride: int) -> None:
    T, H, D = q.shape
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    dout_q, dout_k = dout_q.contiguous(), dout_k.contiguous()
    copy_v = dout_v is not None
    dout_v = dout_v.contiguous() if copy_v else dout_q
    _bwd_kernel[(triton.cdiv(T, BLOCK_T),)](q, k, dout_q, dout_k, dout_v, cos2, sin2, rstd, dq, dk,
                                            dv if copy_v else dq, T, q.stride(0), q.stride(1), k.stride(0),
                                            k.stride(1), cos2.stride(0), row_stride, COPY_V=copy_v, H=H,
                                            HP=triton.next_power_of_2(H), HALF=D // 2, BLOCK_T=BLOCK_T, num_warps=4)


@qk_norm_rotary_fwd.register_fake
def _(q, k, cos, sin, eps):
    T, H, D = q.shape
    return q.new_empty((T, H, D)), k.new_empty((T, H, D)), q.new_empty((T, 2, H), dtype=torch.float32)


@torch.library.custom_op("trainer::qk_norm_rotary_bwd", mutates_args=())
def qk_norm_rotary_bwd(q: Tensor, k: Tensor, dout_q: Tensor, dout_k: Tensor, cos: Tensor, sin: Tensor,
                       rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(dq, dk), contiguous (T, H, D) in q's dtype."""
    T, H, D = _check(q, k, cos)
    dq = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((T, H, D), device=k.device, dtype=k.dtype)
    _bwd(q, k, dout_q, dout_k, None, cos, sin, rstd, dq, dk, None, H * D)
    return dq, dk


@qk_norm_rotary_bwd.register_fake
def _(q, k, dout_q, dout_k, cos, sin, rstd):
    T, H, D = q.shape
    return q.new_empty((T, H, D)), k.new_empty((T, H, D))


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, _ = inputs
    ctx.save_for_backward(q, k, cos, sin, output[2])


def _backward(ctx, dq_out, dk_out, _drstd):
    q, k, cos, sin, rstd = ctx.saved_tensors
    dq, dk = qk_norm_rotary_bwd(q, k, dq_out, dk_out, cos, sin, rstd)
    return dq, dk, None, None, None


qk_norm_rotary_fwd.register_autograd(_backward, setup_context=_setup_context)


# The packed variant (model.fused_qkv): the op takes the QKV product whole and passes v (+ ve) through, so
# that its backward writes the product's gradient (T, 3, H, D) itself. Separate, dq and dk come from this
# op and dv from the attention kernel, all opaque to Inductor, which then gathers the three into one
# tensor with a copy of its own (12.7 ms of a 592 ms speedrun step at 393k on an H200, session 8).
@torch.library.custom_op("trainer::qkv_norm_rotary_fwd", mutates_args=())
def qkv_norm_rotary_fwd(qkv: Tensor, ve: Optional[Tensor], cos: Tensor, sin: Tensor,  # noqa: UP045 (the op schema)
                        eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q_out, k_out, v_out, rstd) from the (T, 3, H, D) product: q, k as qk_norm_rotary_fwd's, v_out =
    v (+ ve, (T, H, D)), all contiguous (T, H, D) in qkv's dtype."""
    q, k, v = qkv.unbind(1)
    T, H, D = _check(q, k, cos)
    if ve is not None and (ve.shape != v.shape or ve.stride(2) != 1):
        raise ValueError(f"qkv_norm_rotary: ve {tuple(ve.shape)} must be v's shape {tuple(v.shape)}, unit last stride")
    out_q, out_k, out_v = (torch.empty((T, H, D), device=qkv.device, dtype=qkv.dtype) for _ in range(3))
    rstd = torch.empty((T, 2, H), device=qkv.device, dtype=torch.float32)
    _fwd(q, k, v, ve, cos, sin, out_q, out_k, out_v, rstd, eps)
    return out_q, out_k, out_v, rstd


@qkv_norm_rotary_fwd.register_fake
def _(qkv, ve, cos, sin, eps):
    T, _, H, D = qkv.shape
    return (qkv.new_empty((T, H, D)), qkv.new_empty((T, H, D)), qkv.new_empty((T, H, D)),
            qkv.new_empty((T, 2, H), dtype=torch.float32))


@torch.library.custom_op("trainer::qkv_norm_rotary_bwd", mutates_args=())
def qkv_norm_rotary_bwd(qkv: Tensor, dout_q: Tensor, dout_k: Tensor, dout_v: Tensor, cos: Tensor, sin: Tensor,
                        rstd: Tensor) -> Tensor:
    """The gradient of the (T, 3, H, D) product, contiguous, in one pass: dq, dk, and dv = dout_v."""
    q, k, _ = qkv.unbind(1)
    T, H, D = _check(q, k, cos)
    dqkv = torch.empty((T, 3, H, D), device=qkv.device, dtype=qkv.dtype)
    _bwd(q, k, dout_q, dout_k, dout_v, cos, sin, rstd, dqkv[:, 0], dqkv[:, 1], dqkv[:, 2], 3 * H * D)
    return dqkv


@qkv_norm_rotary_bwd.register_fake
def _(qkv, dout_q, dout_k, dout_v, cos, sin, rstd):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context_qkv(ctx, inputs, output) -> None:
    qkv, ve, cos, sin, _ = inputs
    ctx.has_ve = ve is not None
    ctx.save_for_backward(qkv, cos, sin, output[3])


def _backward_qkv(ctx, dq_out, dk_out, dv_out, _drstd):
    qkv, cos, sin, rstd = ctx.saved_tensors
    T, _, H, D = qkv.shape
    zeros = lambda: qkv.new_zeros((T, H, D))  # noqa: E731 - an output nothing downstream used
    dq_out = zeros() if dq_out is None else dq_out
    dk_out = zeros() if dk_out is None else dk_out
    dv_out = zeros() if dv_out is None else dv_out
    dqkv = qkv_norm_rotary_bwd(qkv, dq_out, dk_out, dv_out, cos, sin, rstd)
    return dqkv, (dv_out if ctx.has_ve else None), None, None, None  # v_out = v + ve: ve's gradient is v's


qkv_norm_rotary_fwd.register_autograd(_backward_qkv, setup_context=_setup_context_qkv)


def _eps(dtype: torch.dtype) -> float:
    # F.rms_norm's default eps is the machine epsilon of its compute type, fp32 for bf16 inputs (not bf16's
    # 2⁻⁷, which would visibly change the norm of small q/k rows)
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def qkv_norm_rotary(qkv: Tensor, ve: Tensor | None, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k as `norm_rotary` gives them and v (+ ve) from the (T, 3, H, D) QKV product (last dim
    contiguous); the backward writes the product's gradient whole (model.fused_qkv)."""
    T = qkv.shape[0]
    out_q, out_k, out_v, _ = qkv_norm_rotary_fwd(qkv, ve, cos[:T], sin[:T], _eps(qkv.dtype))
    return out_q, out_k, out_v


def norm_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rms_norm then apply_rotary of q and k ((T, H, D), last dim contiguous) with (T, 1, D/2)
    tables; returns contiguous (T, H, D) tensors in q's dtype."""
    out_q, out_k, _ = qk_norm_rotary_fwd(q, k, cos[:q.shape[0]], sin[:q.shape[0]], _eps(q.dtype))
    return out_q, out_k


__all__ = ["norm_rotary", "qkv_norm_rotary", "available", "usable", "qk_norm_rotary_fwd", "qk_norm_rotary_bwd",
           "qkv_norm_rotary_fwd", "qkv_norm_rotary_bwd"]

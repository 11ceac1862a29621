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

forward: per program BLOCK_T tokens × all heads of q and of k: sum of squares per (token, head),
r = rsqrt(mean + eps), y = x·r, out = (y1·cos + y2·sin, y2·cos − y1·sin); r is kept (T, 2, H).
backward: the rotation transposed, dy = (do1·cos − do2·sin, do1·sin + do2·cos), then
dx = r·dy − x·r³·mean(dy·x).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it (then this path is off)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines without triton
    triton = None


if triton is not None:
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
    def _fwd_kernel(q, k, cos, sin, out_q, out_k, rstd, T, s_qt, s_qh, s_kt, s_kh, s_ct, eps,
                    H: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr):
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

    @triton.jit
    def _bwd_kernel(q, k, dout_q, dout_k, cos, sin, rstd, dq, dk, T, s_qt, s_qh, s_kt, s_kh, s_ct,
                    H: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr):
        t, h, tt, hh, cc, mask, cs, sn = _tile(cos, sin, s_ct, T, H, HP, HALF, BLOCK_T)
        g = tt * (H * 2 * HALF) + hh * (2 * HALF) + cc  # (T, H, D) contiguous gradients
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
            tl.store(dst + g, (rr * dy1 - x1 * r3).to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + g + HALF, (rr * dy2 - x2 * r3).to(dst.dtype.element_ty), mask=mask)


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
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    _fwd_kernel[(triton.cdiv(T, BLOCK_T),)](q, k, cos2, sin2, out_q, out_k, rstd, T, q.stride(0), q.stride(1),
                                            k.stride(0), k.stride(1), cos2.stride(0), eps, H=H,
                                            HP=triton.next_power_of_2(H), HALF=D // 2, BLOCK_T=BLOCK_T, num_warps=4)
    return out_q, out_k, rstd


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
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    _bwd_kernel[(triton.cdiv(T, BLOCK_T),)](q, k, dout_q.contiguous(), dout_k.contiguous(), cos2, sin2, rstd, dq, dk,
                                            T, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos2.stride(0),
                                            H=H, HP=triton.next_power_of_2(H), HALF=D // 2, BLOCK_T=BLOCK_T,
                                            num_warps=4)
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


def norm_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rms_norm then apply_rotary of q and k ((T, H, D), last dim contiguous) with (T, 1, D/2)
    tables; returns contiguous (T, H, D) tensors in q's dtype."""
    # F.rms_norm's default eps is the machine epsilon of its compute type, fp32 for bf16 inputs (not bf16's
    # 2⁻⁷, which would visibly change the norm of small q/k rows)
    eps = torch.finfo(torch.promote_types(q.dtype, torch.float32)).eps
    out_q, out_k, _ = qk_norm_rotary_fwd(q, k, cos[:q.shape[0]], sin[:q.shape[0]], eps)
    return out_q, out_k


__all__ = ["norm_rotary", "available", "usable", "qk_norm_rotary_fwd", "qk_norm_rotary_bwd"]

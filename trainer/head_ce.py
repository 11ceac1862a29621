"""The training head fused: FP8 lm_head, logit softcap and summed cross-entropy, with Triton kernels.

    from trainer.head_ce import fp8_head_ce
    loss = fp8_head_ce(x, lm_head, targets, (x_s, w_s, g_s), cap=30.0, div=7.5)   # sum over tokens
    python -m pytest tests/trainer/test_head_ce.py -q        # CPU: Triton's interpreter, when triton is installed

What it computes is the model's training loss, Σ_t CE(cap·σ(x_t·Wᵀ/div), y_t), with the records'
FP8 head (e4m3 x and W, e5m2 gradient, the same scales). What changes is how the (T, V) logits
(49,152 × 50,304 bf16 = 4.9 GB per micro-batch at the speedrun's 393k stage) are handled:

- forward: one kernel reads each row once and writes its log-sum-exp. The softcapped logits lie
  in (0, cap), so exp(z − cap) needs no running maximum: lse = cap + log Σ exp(z − cap).
- backward: one pass over the saved logits writes the e5m2 gradient G = (softmax − onehot)·
  dz/draw·grad / g_s; the two FP8 products follow as in the record (dW needs Gᵀ K-major: a
  tiled transposed copy, 1.5× faster than Inductor's).

Inductor fused the same graph into a cross-entropy backward that re-reduced each 50,304-wide row
(10.7 ms per micro-batch on an H200, plus 4.75 ms for the forward: 124 ms of a 710 ms step;
benchmarks/profile_step.py, docs/performance.md). Writing Gᵀ from the same row kernel (a tl.trans
store of 1-byte elements) was slower still, 16.5 ms per micro-batch, and was dropped. GRAD_WRITES_T
(off until timed) tries it again in tiles: _grad_both_kernel stores each BM × BN tile of G and its
transpose the way the tiled transpose does, sparing that copy's read of G.

Numerics follow the record's graph: z = cap·σ(raw/div) is rounded to bf16 as the record's bf16
logits are, everything after it is fp32, and the gradient is rounded once, to e5m2 (the record
rounds it to bf16 first). `model.fused_head_ce: false` uses the PyTorch graph instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it (then this path is off)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines without triton
    triton = None


if triton is not None:
    @triton.jit
    def _bf16(x, NATIVE: tl.constexpr):
        """x rounded to the nearest bf16 (ties to even), as fp32. NATIVE: one conversion
        instruction (GPU); else bit arithmetic giving the same bits, for Triton's interpreter,
        which truncates .to(tl.bfloat16). x must be finite."""
        if NATIVE:
            return x.to(tl.bfloat16).to(tl.float32)
        else:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _lse_kernel(logits, targets, lse, loss, zout, stride, cap, inv_div, V: tl.constexpr, BLOCK: tl.constexpr,
                    NATIVE: tl.constexpr, STORE_Z: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            raw = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            z = _bf16(cap * tl.sigmoid(raw * inv_div), NATIVE)
            if STORE_Z:  # z is a bf16 value already: the store is exact
                tl.store(zout + row * V + cols, z.to(tl.bfloat16), mask=cols < V)
            acc += tl.where(cols < V, tl.exp(z - cap), 0.0)
        row_lse = cap + tl.log(tl.sum(acc, axis=0))
        t = tl.load(targets + row)
        zt = _bf16(cap * tl.sigmoid(tl.load(base + t).to(tl.float32) * inv_div), NATIVE)
        tl.store(lse + row, row_lse)
        tl.store(loss + row, row_lse - zt)

    @triton.jit
    def _grad_kernel(logits, targets, lse, grad_out, g, stride, cap, inv_div, inv_gs, V: tl.constexpr,
                     BLOCK: tl.constexpr, NATIVE: tl.constexpr, FROM_Z: tl.constexpr):
        """FROM_Z: `logits` holds z (the lse pass's STORE_Z output), not the raw logits."""
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride
        out = g + row * V
        row_lse = tl.load(lse + row)
        t = tl.load(targets + row)
        scale = tl.load(grad_out).to(tl.float32) * inv_gs
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            if FROM_Z:
                z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            else:
                raw = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
                z = _bf16(cap * tl.sigmoid(raw * inv_div), NATIVE)
            gz = tl.exp(z - row_lse) - tl.where(cols == t, 1.0, 0.0)
            gr = gz * (z * inv_div) * (1.0 - z * (1.0 / cap)) * scale
            tl.store(out + cols, gr.to(tl.float8e5, fp_downcast_rounding="rtne"), mask=cols < V)

    @triton.jit
    def _grad_both_kernel(logits, targets, lse, grad_out, g, gt, stride, N, cap, inv_div, inv_gs, V: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, NATIVE: tl.constexpr, FROM_Z: tl.constexpr):
        """_grad_kernel's G, per BM × BN tile instead of per row, stored twice: G (N, V) and Gᵀ (V, N), both
        as bytes (g, gt: uint8 views). The same arithmetic per element, so the same bits as _grad_kernel
        followed by _transpose_kernel, without reading G back."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        r64 = rows.to(tl.int64)
        rmask = rows < N
        mask = rmask[:, None] & (cols[None, :] < V)
        row_lse = tl.load(lse + r64, mask=rmask, other=0.0)
        t = tl.load(targets + r64, mask=rmask, other=-1)
        scale = tl.load(grad_out).to(tl.float32) * inv_gs
        if FROM_Z:
            z = tl.load(logits + r64[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            raw = tl.load(logits + r64[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            z = _bf16(cap * tl.sigmoid(raw * inv_div), NATIVE)
        gz = tl.exp(z - row_lse[:, None]) - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
        gr = gz * (z * inv_div) * (1.0 - z * (1.0 / cap)) * scale
        b = gr.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        tl.store(g + r64[:, None] * V + cols[None, :], b, mask=mask)
        tl.store(gt + cols[:, None].to(tl.int64) * N + r64[None, :], tl.trans(b),
                 mask=(cols[:, None] < V) & rmask[None, :])

    @triton.jit
    def _transpose_kernel(src, dst, N, V, BM: tl.constexpr, BN: tl.constexpr):
        """dst (V, N) = srcᵀ for 1-byte elements, one BM × BN tile per program."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        tile = tl.load(src + rows[:, None].to(tl.int64) * V + cols[None, :],
                       mask=(rows[:, None] < N) & (cols[None, :] < V))
        tl.store(dst + cols[:, None].to(tl.int64) * N + rows[None, :], tl.trans(tile),
                 mask=(cols[:, None] < V) & (rows[None, :] < N))


def available() -> bool:
    """Whether the fused head can run: Triton importable (its kernels run on CUDA devices, or on
    the CPU under TRITON_INTERPRET=1 for tests)."""
    return triton is not None


# Launch parameters of the passes, from benchmarks/bench_head.py on an H200 (docs/performance.md):
# column block × warps made ≤ 3 % difference around these; the native bf16 rounding made the
# gradient pass 6 % faster (2.94 vs 3.14 ms per 49,152 × 50,304 micro-batch) and the lse pass 3 %
# slower (2.62 vs 2.54 ms), so the lse pass keeps the bit arithmetic (the same bits either way).
# The 128 × 128 transpose tiles took 1.30 ms where Inductor's transposed copy took 1.98 ms.
LSE_LAUNCH = {"block": 2048, "warps": 8, "native": False}
GRAD_LAUNCH = {"block": 2048, "warps": 8, "native": True}
TRANSPOSE_LAUNCH = {"bm": 128, "bn": 128, "warps": 8}
# Whether the lse pass also writes z = cap·σ(raw/div) (bf16, exact) for the gradient pass to read,
# trading a 4.9 GB write per micro-batch for two special-function ops per logit. benchmarks/bench_head.py
# on an H200: lse 2.543 + grad 2.951 = 5.495 ms without, 2.748 + 1.859 = 4.607 ms with (1.19×, same bits).
SAVE_Z = True
# Whether the gradient pass writes Gᵀ itself (_grad_both_kernel: BM × BN tiles, G and Gᵀ stored from the same
# registers) instead of _grad_kernel then transpose_fp8, which reads G back (2.5 GB per micro-batch at 393k).
# The same bits either way (tests/trainer/test_head_ce.py). Off until benchmarks/bench_head.py has timed it on
# a GPU: the row kernel writing Gᵀ was much slower (module docstring); this one stores tiles as the transpose does.
GRAD_WRITES_T = False
GRAD_BOTH_LAUNCH = {"bm": 128, "bn": 128, "warps": 8}


def lse_pass(logits: Tensor, targets: Tensor, cap: float, div: float, block: int, warps: int,
             native: bool = True, store_z: bool = False) -> tuple[Tensor, ...]:
    """(loss, lse), or (loss, lse, z) with store_z: the softcapped bf16 logits z, which the
    gradient pass can read instead of recomputing them (from_z)."""
    N, V = logits.shape
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    z = torch.empty((N, V), device=logits.device, dtype=torch.bfloat16) if store_z else lse
    _lse_kernel[(N,)](logits, targets, lse, loss, z, logits.stride(0), cap, 1.0 / div, V=V, BLOCK=block,
                      NATIVE=native and logits.is_cuda, STORE_Z=store_z, num_warps=warps)
    return (loss, lse, z) if store_z else (loss, lse)


def transpose_pass(g: Tensor, bm: int, bn: int, warps: int) -> Tensor:
    """gᵀ made contiguous ((V, N) e5m2 from (N, V)) by a tiled Triton copy."""
    N, V = g.shape
    out = torch.empty((V, N), device=g.device, dtype=g.dtype)
    _transpose_kernel[(triton.cdiv(N, bm), triton.cdiv(V, bn))](g.view(torch.uint8), out.view(torch.uint8), N, V,
                                                                BM=bm, BN=bn, num_warps=warps)
    return out


def grad_pass(logits: Tensor, targets: Tensor, lse: Tensor, grad_out: Tensor, cap: float, div: float, g_s: float,
              block: int, warps: int, native: bool = True, from_z: bool = False) -> Tensor:
    """G in e5m2 from the raw logits, or from z (lse_pass's third output) with from_z: the same bits."""
    N, V = logits.shape
    g = torch.empty((N, V), device=logits.device, dtype=torch.float8_e5m2)
    _grad_kernel[(N,)](logits, targets, lse, grad_out, g, logits.stride(0), cap, 1.0 / div, 1.0 / g_s, V=V,
                       BLOCK=block, NATIVE=native and logits.is_cuda, FROM_Z=from_z, num_warps=warps)
    return g


def grad_both_pass(logits: Tensor, targets: Tensor, lse: Tensor, grad_out: Tensor, cap: float, div: float,
                   g_s: float, bm: int, bn: int, warps: int, native: bool = True,
                   from_z: bool = False) -> tuple[Tensor, Tensor]:
    """(G, Gᵀ contiguous) in e5m2 from one pass: grad_pass then transpose_pass, without reading G back."""
    N, V = logits.shape
    g = torch.empty((N, V), device=logits.device, dtype=torch.float8_e5m2)
    gt = torch.empty((V, N), device=logits.device, dtype=torch.float8_e5m2)
    _grad_both_kernel[(triton.cdiv(N, bm), triton.cdiv(V, bn))](
        logits, targets, lse, grad_out, g.view(torch.uint8), gt.view(torch.uint8), logits.stride(0), N, cap,
        1.0 / div, 1.0 / g_s, V=V, BM=bm, BN=bn, NATIVE=native and logits.is_cuda, FROM_Z=from_z, num_warps=warps)
    return g, gt


@torch.library.custom_op("trainer::softcap_ce_lse", mutates_args=())
def softcap_ce_lse(logits: Tensor, targets: Tensor, cap: float, div: float) -> tuple[Tensor, Tensor]:
    """(per-row loss, per-row lse), fp32 (N,), of softcapped cross-entropy over bf16 (N, V) logits."""
    return lse_pass(logits, targets, cap, div, **LSE_LAUNCH)


@softcap_ce_lse.register_fake
def _(logits, targets, cap, div):
    N = logits.shape[0]
    return logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("trainer::softcap_ce_grad_fp8", mutates_args=())
def softcap_ce_grad_fp8(logits: Tensor, targets: Tensor, lse: Tensor, grad_out: Tensor, cap: float, div: float,
                        g_s: float) -> Tensor:
    """G in e5m2 (N, V), G = ∂(grad_out · Σ loss)/∂logits / g_s."""
    return grad_pass(logits, targets, lse, grad_out, cap, div, g_s, **GRAD_LAUNCH)


@softcap_ce_grad_fp8.register_fake
def _(logits, targets, lse, grad_out, cap, div, g_s):
    return logits.new_empty(logits.shape, dtype=torch.float8_e5m2)


@torch.library.custom_op("trainer::softcap_ce_lse_z", mutates_args=())
def softcap_ce_lse_z(logits: Tensor, targets: Tensor, cap: float, div: float) -> tuple[Tensor, Tensor, Tensor]:
    """softcap_ce_lse plus z = cap·σ(logits/div) in bf16 (N, V), for softcap_ce_grad_fp8_from_z."""
    return lse_pass(logits, targets, cap, div, **LSE_LAUNCH, store_z=True)


@softcap_ce_lse_z.register_fake
def _(logits, targets, cap, div):
    N = logits.shape[0]
    return (logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32),
            logits.new_empty(logits.shape, dtype=torch.bfloat16))


@torch.library.custom_op("trainer::softcap_ce_grad_fp8_from_z", mutates_args=())
def softcap_ce_grad_fp8_from_z(z: Tensor, targets: Tensor, lse: Tensor, grad_out: Tensor, cap: float, div: float,
                               g_s: float) -> Tensor:
    """softcap_ce_grad_fp8 from the stored z instead of the raw logits (no sigmoid per logit): the same G."""
    return grad_pass(z, targets, lse, grad_out, cap, div, g_s, **GRAD_LAUNCH, from_z=True)


@softcap_ce_grad_fp8_from_z.register_fake
def _(z, targets, lse, grad_out, cap, div, g_s):
    return z.new_empty(z.shape, dtype=torch.float8_e5m2)


@torch.library.custom_op("trainer::transpose_fp8", mutates_args=())
def transpose_fp8(g: Tensor) -> Tensor:
    """gᵀ as a contiguous (V, N) tensor: the K-major operand the FP8 weight-gradient product needs."""
    return transpose_pass(g, **TRANSPOSE_LAUNCH)


@transpose_fp8.register_fake
def _(g):
    return g.new_empty((g.shape[1], g.shape[0]))


@torch.library.custom_op("trainer::softcap_ce_grad_fp8_both", mutates_args=())
def softcap_ce_grad_fp8_both(kept: Tensor, targets: Tensor, lse: Tensor, grad_out: Tensor, cap: float, div: float,
                             g_s: float, from_z: bool) -> tuple[Tensor, Tensor]:
    """(G, Gᵀ) in e5m2 from the raw logits or (from_z) the stored z: softcap_ce_grad_fp8(_from_z) and
    transpose_fp8 in one pass (GRAD_WRITES_T)."""
    return grad_both_pass(kept, targets, lse, grad_out, cap, div, g_s, **GRAD_BOTH_LAUNCH, from_z=from_z)


@softcap_ce_grad_fp8_both.register_fake
def _(kept, targets, lse, grad_out, cap, div, g_s, from_z):
    N, V = kept.shape
    return kept.new_empty((N, V), dtype=torch.float8_e5m2), kept.new_empty((V, N), dtype=torch.float8_e5m2)


class _FP8HeadCE(torch.autograd.Function):
    """Σ CE(cap·σ((x·Wᵀ)/div), y) with the FP8 head; see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, targets: Tensor, x_s: float, w_s: float, g_s: float, cap: float,
                div: float) -> Tensor:
        x_f8 = x.contiguous().div(x_s).to(torch.float8_e4m3fn)
        w_f8 = w.div(w_s).to(torch.float8_e4m3fn)
        one = torch.ones((), device=x.device, dtype=torch.float32)
        logits = torch._scaled_mm(x_f8, w_f8.t(), out_dtype=torch.bfloat16, scale_a=one * x_s,
                                  scale_b=one * w_s, use_fast_accum=True)
        if SAVE_Z:  # the backward reads z: the raw logits die here, one sigmoid per logit saved
            loss, lse, kept = softcap_ce_lse_z(logits, targets, cap, div)
        else:
            (loss, lse), kept = softcap_ce_lse(logits, targets, cap, div), logits
        ctx.save_for_backward(x_f8, w_f8, kept, targets, lse)
        ctx.consts, ctx.w_dtype, ctx.from_z = (x_s, w_s, g_s, cap, div), w.dtype, SAVE_Z
        return loss.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_f8, w_f8, kept, targets, lse = ctx.saved_tensors
        x_s, w_s, g_s, cap, div = ctx.consts
        if GRAD_WRITES_T:
            g, gt = softcap_ce_grad_fp8_both(kept, targets, lse, grad.float().reshape(1), cap, div, g_s, ctx.from_z)
        else:
            grad_op = softcap_ce_grad_fp8_from_z if ctx.from_z else softcap_ce_grad_fp8
            g, gt = grad_op(kept, targets, lse, grad.float().reshape(1), cap, div, g_s), None
        one = torch.ones((), device=g.device, dtype=torch.float32)
        # the records' two FP8 products; fp8 GEMMs take K-major operands, hence Gᵀ's copy (a Triton kernel)
        grad_x = torch._scaled_mm(g, w_f8.t().contiguous().t(), out_dtype=torch.bfloat16, scale_a=one * g_s,
                                  scale_b=one * w_s, use_fast_accum=False)
        gt = transpose_fp8(g) if gt is None else gt  # after grad_x, as before GRAD_WRITES_T (peak memory)
        grad_w = torch._scaled_mm(x_f8.t().contiguous(), gt.t(), out_dtype=torch.float32,
                                  scale_a=one * x_s, scale_b=one * g_s, use_fast_accum=False).t()
        return grad_x, grad_w.to(ctx.w_dtype), None, None, None, None, None, None


def fp8_head_ce(x: Tensor, w: Tensor, targets: Tensor, scales: tuple[float, float, float], cap: float,
                div: float) -> Tensor:
    """Summed softcapped cross-entropy of the FP8 head (x (T, d) bf16, w (V, d), targets (T,) int64)."""
    return _FP8HeadCE.apply(x, w, targets, *scales, cap, div)


__all__ = ["fp8_head_ce", "softcap_ce_lse", "softcap_ce_grad_fp8", "softcap_ce_lse_z", "softcap_ce_grad_fp8_from_z",
           "softcap_ce_grad_fp8_both", "available"]

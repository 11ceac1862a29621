"""FlashAttention-4 (`flash-attn-4`, CuTe-DSL kernels) as a torch.library custom op.

    from trainer.fa4 import fa4_available, fa4_attention
    ok, why = fa4_available(torch.device("cuda"))
    y = fa4_attention(q, k, v, cu_seqlens, max_seqlen, window, scale)   # (T, H, D) bf16 → (T, H, D)
    python -m pytest tests/trainer/test_fa4.py -q          # CPU: the op's plumbing; GPU: the kernels

The documents of the flat packed sequence are FlashAttention's varlen batch: `cu_seqlens` (int32,
fixed length, padded with T) holds their boundaries; a query sees the keys of its own document
with 0 ≤ q − k ≤ window (`window_size=(window, 0)`), the trainer's rule. `window` and the softmax
`scale` are 0-d CPU tensors: they reach the kernel as host numbers without a device sync, and as
tensors they are data to torch.compile, so a new window or YaRN scale reuses the compiled graph
(as the flex path's device tensors do). The op has a fake kernel and a registered backward, so
the model compiles with fullgraph=True around it.

Only the CUDA kernel needs flash-attn-4 (`pip install -e ".[fa4]"`, a Hopper or newer GPU). A
CPU kernel of the same op (dense masked attention in fp32) lets the CPU tests exercise the op's
registration, autograd and compile behaviour.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

FA4_INSTALL = 'pip install -e ".[fa4]"'


@functools.lru_cache(maxsize=None)
def _import_error() -> str:
    try:
        from flash_attn.cute import interface  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return ""


def fa4_available(device: torch.device) -> tuple[bool, str]:
    """(usable, reason if not): flash_attn.cute imports and `device` is a CUDA GPU of sm90+."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "FlashAttention-4 runs on CUDA GPUs only"
    cap = torch.cuda.get_device_capability(device)
    if cap < (9, 0):
        return False, f"FlashAttention-4 needs compute capability ≥ 9.0 (Hopper); this GPU is {cap[0]}.{cap[1]}"
    err = _import_error()
    if err:
        return False, f"flash_attn.cute does not import ({err}); install it with `{FA4_INSTALL}`"
    return True, ""


def docs_from_cu_seqlens(cu_seqlens: Tensor, T: int) -> Tensor:
    """Document id per position (T,) from boundaries padded with T (test and reference helper)."""
    pos = torch.arange(T, device=cu_seqlens.device)
    return (cu_seqlens[None, 1:].to(pos.dtype) <= pos[:, None]).sum(-1)


def _probs(q: Tensor, k: Tensor, cu_seqlens: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    """Dense fp32 attention probabilities (H, T, T) with the varlen + window rule, and lse (H, T)."""
    T = q.shape[0]
    docs = docs_from_cu_seqlens(cu_seqlens, T)
    pos = torch.arange(T, device=q.device)
    diff = pos[:, None] - pos[None, :]
    mask = (diff >= 0) & (diff <= window) & (docs[:, None] == docs[None, :])
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.softmax(s, dim=-1), torch.logsumexp(s, dim=-1)


@torch.library.custom_op("trainer::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window: Tensor,
            scale: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of varlen sliding-window attention; see the module docstring."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                   max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, softmax_scale=float(scale),
                                   causal=True, window_size_left=int(window), window_size_right=0,
                                   return_lse=True)
    return out, lse


@fa4_fwd.register_kernel("cpu")
def _fa4_fwd_cpu(q, k, v, cu_seqlens, max_seqlen, window, scale):
    p, lse = _probs(q, k, cu_seqlens, int(window), float(scale))
    return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype).contiguous(), lse.contiguous()


@fa4_fwd.register_fake
def _fa4_fwd_fake(q, k, v, cu_seqlens, max_seqlen, window, scale):
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("trainer::fa4_bwd", mutates_args=())
def fa4_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
            max_seqlen: int, window: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of fa4_fwd."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, float(scale), True, 0.0,
                                 window_size_left=int(window), window_size_right=0, cu_seqlens_q=cu_seqlens,
                                 cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    return dq, dk, dv


@fa4_bwd.register_kernel("cpu")
def _fa4_bwd_cpu(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, scale):
    # softmax backward by hand (a kernel runs below autograd): dS = P ⊙ (dP − rowsum(dO ⊙ O))
    p, _ = _probs(q, k, cu_seqlens, int(window), float(scale))
    do, of = dout.float(), torch.einsum("hqk,khd->qhd", p, v.float())
    dv = torch.einsum("hqk,qhd->khd", p, do)
    dp = torch.einsum("qhd,khd->hqk", do, v.float())
    ds = p * (dp - (do * of).sum(-1).transpose(0, 1)[:, :, None])
    dq = torch.einsum("hqk,khd->qhd", ds, k.float()) * float(scale)
    dk = torch.einsum("hqk,qhd->khd", ds, q.float()) * float(scale)
    return tuple(g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


@fa4_bwd.register_fake
def _fa4_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, window, scale)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, window, scale = ctx.saved_tensors
    dq, dk, dv = fa4_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, window, scale)
    return dq, dk, dv, None, None, None, None


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def fa4_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window: Tensor | int,
                  scale: Tensor | float) -> Tensor:
    """Attention of (T, H, D) q, k, v over the documents in cu_seqlens; returns (T, H, D).

    `max_seqlen` must bound every document's length (it sizes the kernel's grid); `window` and
    `scale` should be 0-d CPU tensors inside a compiled model (Python numbers are accepted eagerly)."""
    if not isinstance(window, Tensor):
        window = torch.tensor(int(window), dtype=torch.int32)
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32)
    q, k, v = (t.contiguous() for t in (q, k, v))  # the kernels' layout, and the fake kernels' promise
    return fa4_fwd(q, k, v, cu_seqlens, max_seqlen, window, scale)[0]


__all__ = ["FA4_INSTALL", "fa4_available", "fa4_attention", "docs_from_cu_seqlens"]

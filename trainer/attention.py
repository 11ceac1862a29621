"""Attention pieces: half-truncated rotary with YaRN window extension, and the masked kernel.

A rank's micro-batch is one flat packed sequence of T tokens; a query at position q sees a key at
k iff docs[q] == docs[k] and 0 ≤ q − k ≤ window (FlashAttention's window (window, 0) convention).
Two backends (model.attn_backend):

- "flex": torch.nn.attention.flex_attention with a BlockMask built directly from block-level
  document/causal/window bounds (no T×T mask), compiled with the model on GPU. PyTorch has no
  CPU backward for FlexAttention, so on CPU it serves forward passes only.
- "sdpa": F.scaled_dot_product_attention with an explicit boolean mask over query chunks and
  their window of keys (banded, T·(chunk + window) work instead of T²): simple, runs anywhere,
  and the CPU training path. `reference_attention` is the plain full-mask version for tests.

    python -m pytest tests/trainer/test_model.py -q
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_BLOCK = 128  # BlockMask granularity (FlexAttention's default tile)


# --------------------------------------------------------------------------------------------
# Rotary + YaRN
# --------------------------------------------------------------------------------------------
class Rotary(nn.Module):
    """Half-truncated RoPE (rope_freqs frequencies from 1 down to min_freq rad/token, the other
    head_dim/2 − rope_freqs pairs fixed) with YaRN extension as the attention window grows.

    `extend(old, new)` (windows in tokens) interpolates the low-frequency dims:
    r = old·ω/(2π); w = clip((r − α)/(β − α), 0, 1); ω ← ω·(s + w(1 − s)) with s = old/new, and
    multiplies attn_scale by 0.2·ln(new/old) + 1. `reset()` restores the base state."""

    def __init__(self, head_dim: int, rope_freqs: int, min_freq: float, attn_scale: float,
                 alpha: float, beta: float) -> None:
        super().__init__()
        half = head_dim // 2
        base = torch.zeros(half, dtype=torch.float32)
        if rope_freqs:
            base[:rope_freqs] = min_freq ** torch.linspace(0, 1, rope_freqs, dtype=torch.float64).float()
        self.register_buffer("omega_base", base, persistent=False)
        self.register_buffer("omega", base.clone(), persistent=False)
        self.attn_scale_init = float(attn_scale)
        self.attn_scale = float(attn_scale)
        # The same value as a 0-d buffer: the compiled model reads this one, so a YaRN step changes
        # data, not a guarded Python constant (no recompile per window).
        self.register_buffer("attn_scale_t", torch.tensor(float(attn_scale)), persistent=False)
        self.alpha, self.beta = float(alpha), float(beta)

    @torch.no_grad()
    def extend(self, old_window: int, new_window: int) -> None:
        if new_window == old_window:
            return
        r = old_window * self.omega.double() / (2 * math.pi)
        w = ((r - self.alpha) / (self.beta - self.alpha)).clamp(0.0, 1.0)
        s = old_window / new_window
        self.omega.copy_((self.omega.double() * (s + w * (1 - s))).float())
        self.attn_scale *= 0.2 * math.log(new_window / old_window) + 1.0
        self.attn_scale_t.fill_(self.attn_scale)

    @torch.no_grad()
    def reset(self) -> None:
        self.omega.copy_(self.omega_base)
        self.attn_scale = self.attn_scale_init
        self.attn_scale_t.fill_(self.attn_scale)

    def cos_sin(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape (T, 1, head_dim/2), fp32, for positions 0..T-1 of the flat sequence."""
        theta = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.omega)
        return theta.cos()[:, None, :], theta.sin()[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (T, H, D) by the angle tables; dims i and i + D/2 form a pair. Math in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def dense_mask(docs: Tensor, window: int) -> Tensor:
    """(T, T) bool: same document, causal, q − k ≤ window."""
    pos = torch.arange(docs.numel(), device=docs.device)
    diff = pos[:, None] - pos[None, :]
    return (diff >= 0) & (diff <= window) & (docs[:, None] == docs[None, :])


def block_classes(docs: Tensor, window: int, block: int = MASK_BLOCK) -> tuple[Tensor, Tensor]:
    """(any, full) masks over (q block, kv block): some / every pair of the tile is visible.

    docs must be non-decreasing and length a multiple of `block`; each block then spans a
    contiguous range of document ids, so interval overlap decides "any"."""
    n = docs.numel() // block
    d = docs.view(n, block)
    lo, hi = d[:, 0], d[:, -1]
    i = torch.arange(n, device=docs.device)
    delta = i[:, None] - i[None, :]  # q block − kv block
    same_doc_any = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])
    same_doc_all = (lo[:, None] == hi[:, None]) & (lo[None, :] == hi[None, :]) & (lo[:, None] == lo[None, :])
    any_ = (delta >= 0) & (delta * block - (block - 1) <= window) & same_doc_any
    full = (delta > 0) & (delta * block + (block - 1) <= window) & same_doc_all
    return any_, full


def _ordered(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(count, indices) of each row's True columns, as FlexAttention's BlockMask stores them.

    Equal to a stable descending argsort of the 0/1 rows (True columns in order, then the rest in
    order) but built from cumulative sums and a binary search: slot p of a row holds the column
    where the row's running count of True (p < count) or False columns first reaches p + 1. An
    in-graph sort compiles into huge Triton kernels (4.9 MB cubins, the longest pole of a cold
    compile), and a scatter of the inverse permutation fails Inductor's Triton codegen from
    256 × 256 blocks on (torch 2.11; benchmarks/gpu_mask_check.py, docs/performance.md)."""
    m = mask.to(torch.int32)
    n = m.shape[-1]
    num = m.sum(dim=-1, dtype=torch.int32)
    slot = torch.arange(n, device=mask.device, dtype=torch.int32).expand_as(m)
    col_true = torch.searchsorted(torch.cumsum(m, dim=-1), (slot + 1).contiguous(), side="left")
    col_false = torch.searchsorted(torch.cumsum(1 - m, dim=-1), (slot - num[:, None] + 1).contiguous(), side="left")
    idx = torch.where(slot < num[:, None], col_true, col_false).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def flex_block_mask(docs: Tensor, window: int | Tensor, block: int = MASK_BLOCK):
    """FlexAttention BlockMask for the document + causal + window rule; len(docs) % block == 0.

    Built directly from the dense block classes, both orientations (kv blocks per q block for
    the forward, q blocks per kv block for the backward), with no sort (see _ordered)."""
    from torch.nn.attention.flex_attention import BlockMask

    any_, full = block_classes(docs, window, block)
    partial = any_ & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    q_num, q_idx = _ordered(partial.transpose(0, 1))
    full_q_num, full_q_idx = _ordered(full.transpose(0, 1))

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (q - kv <= window) & (docs[q] == docs[kv])

    n = docs.numel()
    return BlockMask(seq_lengths=(n, n), kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_num,
                     full_kv_indices=full_idx, q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num,
                     full_q_indices=full_q_idx, BLOCK_SIZE=(block, block), mask_mod=mask_mod)


def _band_chunk(window: int) -> int:
    """Query chunk of the banded SDPA path: ≈ window (cost per query is chunk + window keys)."""
    c = 64
    while c < window and c < 512:
        c *= 2
    return c


def band_mask(docs: Tensor, window: int, chunk: int) -> Tensor:
    """(n, 1, chunk, chunk + window) bool for query chunks of `chunk` tokens against their keys.

    Chunk j holds queries [j·chunk, (j+1)·chunk) and keys [j·chunk − window, (j+1)·chunk); the
    sequence is padded on the right to n·chunk (padded positions form their own document and see
    themselves) and the keys on the left by `window` (never visible)."""
    T = docs.numel()
    n = -(-T // chunk)
    pad = n * chunk - T
    dq = F.pad(docs, (0, pad), value=-2)
    dk = F.pad(dq, (window, 0), value=-1)
    dq = dq.view(n, chunk)
    dk = dk.unfold(0, chunk + window, chunk)  # (n, chunk + window)
    q_pos = torch.arange(chunk, device=docs.device)[:, None] + window
    diff = q_pos - torch.arange(chunk + window, device=docs.device)  # q − k within a chunk
    band = (diff >= 0) & (diff <= window)
    return (band[None] & (dq[:, :, None] == dk[:, None, :]))[:, None]


def build_mask(docs: Tensor, window: int | Tensor, backend: str):
    """The mask of one window for one forward pass (built once, shared by the layers).

    For "flex" the window may be a 0-d tensor, so that one compiled graph serves every window.

    "flex": a BlockMask (docs padded to a multiple of MASK_BLOCK with a fresh document id, so
    padded queries see only padded keys). "sdpa": (band_mask, window, chunk) for the banded path,
    which costs T·(chunk + window) instead of T²."""
    if backend == "flex":
        pad = (-docs.numel()) % MASK_BLOCK
        if pad:
            docs = torch.cat([docs, docs.new_full((pad,), 2**30)])
        return flex_block_mask(docs, window)
    if backend == "sdpa":
        chunk = _band_chunk(window)
        return band_mask(docs, window, chunk), window, chunk
    raise ValueError(f"model.attn_backend={backend!r} is invalid: expected 'flex' or 'sdpa'")


def attend(q: Tensor, k: Tensor, v: Tensor, mask, backend: str, scale: float) -> Tensor:
    """Masked attention of (T, H, D) q, k, v with a mask from build_mask; returns (T, H, D).

    The model pre-multiplies q by its (tensor) softmax scale and passes scale=1.0."""
    T, H, D = q.shape
    if backend == "sdpa":
        m, window, chunk = mask
        n = m.size(0)
        pad = n * chunk - T
        qc = F.pad(q, (0, 0, 0, 0, 0, pad)).view(n, chunk, H, D).transpose(1, 2)
        kc, vc = (F.pad(t, (0, 0, 0, 0, window, pad)).unfold(0, chunk + window, chunk).permute(0, 1, 3, 2)
                  for t in (k, v))  # (n, H, chunk + window, D)
        y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=m, scale=scale)
        return y.transpose(1, 2).reshape(n * chunk, H, D)[:T]
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    pad = (-T) % MASK_BLOCK
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    y = flex_attention(q, k, v, block_mask=mask, scale=scale)[:, :, :T]
    return y[0].transpose(0, 1)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, docs: Tensor, window: int, scale: float) -> Tensor:
    """Plain SDPA with the full (T, T) mask: the slow reference the fast paths are tested against."""
    y = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                       attn_mask=dense_mask(docs, window), scale=scale)
    return y[0].transpose(0, 1)


__all__ = ["Rotary", "apply_rotary", "dense_mask", "block_classes", "flex_block_mask", "band_mask", "build_mask",
           "attend", "reference_attention"]

"""Attention pieces: half-truncated rotary with YaRN window extension, and the masked kernel.

A rank's micro-batch is one flat packed sequence of T tokens; a query at position q sees a key at
k iff docs[q] == docs[k] and 0 ≤ q − k ≤ window (FlashAttention's window (window, 0) convention).
Three backends (model.attn_backend; "auto" is resolved by the trainer: fa4 on a Hopper+ GPU where
flash-attn-4 imports, else flex on GPU, sdpa on CPU):

- "fa4": FlashAttention-4's varlen kernel (trainer/fa4.py), documents as `cu_seqlens` built on the
  host, `window_size=(window, 0)`; a torch.library custom op, so it compiles with the model. GPU only.
- "flex": torch.nn.attention.flex_attention with a BlockMask built by index arithmetic from
  block-level document/causal/window bounds (block_spans; no T×T mask), compiled with the model
  on GPU. PyTorch has no CPU backward for FlexAttention, so on CPU it serves forward passes only.
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
    multiplies attn_scale by attn_factor·ln(new/old) + 1 (0.2 in the records). `reset()` restores
    the base state. Frequencies and the YaRN update are fp32 with the records' operations; the
    cos/sin tables are `dtype` (bf16 in the records, model.rope_dtype)."""

    def __init__(self, head_dim: int, rope_freqs: int, min_freq: float, attn_scale: float,
                 alpha: float, beta: float, attn_factor: float = 0.2, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        half = head_dim // 2
        base = torch.zeros(half, dtype=torch.float32)
        if rope_freqs:
            base[:rope_freqs] = min_freq ** torch.linspace(0, 1, rope_freqs, dtype=torch.float32)
        self.register_buffer("omega_base", base, persistent=False)
        self.register_buffer("omega", base.clone(), persistent=False)
        self.attn_scale_init = float(attn_scale)
        self.attn_scale = float(attn_scale)
        # The same value as a 0-d buffer: the compiled model reads this one, so a YaRN step changes
        # data, not a guarded Python constant (no recompile per window).
        self.register_buffer("attn_scale_t", torch.tensor(float(attn_scale)), persistent=False)
        # And as a host tensor (not a buffer: it stays on the CPU when the model moves), which the
        # FlashAttention-4 op reads as its softmax scale without a device sync.
        self.attn_scale_host = torch.tensor(float(attn_scale))
        self.alpha, self.beta = float(alpha), float(beta)
        self.attn_factor = float(attn_factor)
        self.dtype = dtype
        # cos/sin of positions 0..len-1 for the current ω (`precompute`); empty until then. Kept as
        # buffers and refreshed in place by extend/reset, so the compiled model loads them: computed
        # inside the graph, Inductor fused cos/sin into the q/k norm + rotary kernels and evaluated
        # them once per head and element (~68 ms of a 643 ms speedrun step on an H200).
        self.register_buffer("cos_table", torch.empty(0, 1, half, dtype=dtype), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, 1, half, dtype=dtype), persistent=False)

    @torch.no_grad()
    def precompute(self, max_len: int) -> None:
        """Keep the tables of positions 0..max_len-1 (the longest flat sequence a forward sees: the
        largest micro-batch or eval batch per rank) on ω's device; longer sequences are computed
        on the fly. A table of the same length is refreshed in place (the same tensors, so a
        compiled graph is not retraced)."""
        if self.cos_table.shape[0] != max_len or self.cos_table.device != self.omega.device:
            shape = (max_len, 1, self.omega.numel())
            self.cos_table = torch.empty(shape, dtype=self.dtype, device=self.omega.device)
            self.sin_table = torch.empty(shape, dtype=self.dtype, device=self.omega.device)
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        n = self.cos_table.shape[0]
        if n:
            cos, sin = self._compute(n, self.omega.device)
            self.cos_table.copy_(cos)
            self.sin_table.copy_(sin)

    def _compute(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        theta = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.omega)
        return theta.cos().to(self.dtype)[:, None, :], theta.sin().to(self.dtype)[:, None, :]

    @torch.no_grad()
    def extend(self, old_window: int, new_window: int) -> None:
        if new_window == old_window:
            return
        r = old_window * self.omega / (2 * math.pi)
        w = torch.clamp((r - self.alpha) / (self.beta - self.alpha), 0, 1)
        s = old_window / new_window
        self.omega.mul_(s + w * (1 - s))
        self.attn_scale *= self.attn_factor * math.log(new_window / old_window) + 1.0
        self.attn_scale_t.fill_(self.attn_scale)
        self.attn_scale_host.fill_(self.attn_scale)
        self._refresh()

    @torch.no_grad()
    def reset(self) -> None:
        self.omega.copy_(self.omega_base)
        self.attn_scale = self.attn_scale_init
        self.attn_scale_t.fill_(self.attn_scale)
        self.attn_scale_host.fill_(self.attn_scale)
        self._refresh()

    def cos_sin(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape (T, 1, head_dim/2) in the table dtype, for positions 0..T-1 of the
        flat sequence; the angles are fp32 (θ = t·ω), rounded to the table dtype after cos/sin.
        Slices of the precomputed tables when they are long enough, else computed here."""
        if T <= self.cos_table.shape[0]:
            return self.cos_table[:T], self.sin_table[:T]
        return self._compute(T, device)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (T, H, D) by the angle tables; dims i and i + D/2 form a pair.

    bf16 tables: the records' `rotary` (x1·cos + x2·sin, x1·(−sin) + x2·cos) in x's dtype, bf16 in
    the model. fp32 tables: the same rotation in fp32, rounded to x's dtype once at the end."""
    if cos.dtype != torch.float32:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)
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


def _span_index(s1: Tensor, n1: Tensor, s2: Tensor, n2: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(count, indices) of rows whose block list is the range [s1, s1+n1) followed by [s2, s2+n2).

    Slot p holds s1 + p, then s2 + p − n1; slots past the count are never read by the kernels
    and hold clamped, in-range filler. Pure index arithmetic: no sort, scatter or search."""
    p = torch.arange(n, device=s1.device, dtype=torch.int32)[None, :]
    idx = torch.where(p < n1[:, None], s1[:, None] + p, s2[:, None] + p - n1[:, None]).clamp(0, n - 1)
    num = (n1 + n2).to(torch.int32)
    return num[None, None].contiguous(), idx.to(torch.int32)[None, None].contiguous()


def block_spans(docs: Tensor, window: int | Tensor, block: int = MASK_BLOCK) -> dict[str, Tensor]:
    """The BlockMask's four (count, indices) pairs by index arithmetic on block bounds.

    docs must be non-decreasing with length a multiple of `block`, so block i spans documents
    lo[i]..hi[i]. Query block i sees key blocks j ≤ i from the first block that reaches its first
    document (count of j with hi[j] < lo[i]) and within the window (i − j ≤ ⌊(window + block − 1)
    / block⌋): one contiguous range ending at i. The fully visible ("full") blocks are the part of
    it that starts inside block i's document, lies strictly before i and within ⌊(window − block +
    1) / block⌋ blocks, and only when block i holds one document. So every row of partial blocks is
    at most two contiguous ranges ([start, full start) and {i}), and columns mirror it ({j} and
    (full end, end]). Each bound is an n×n comparison summed over one axis: reductions and
    pointwise ops only, which Inductor compiles at every size (a sort compiled into multi-MB
    Triton kernels; a scatter and a searchsorted failed Triton codegen at some block counts on
    torch 2.11 — benchmarks/gpu_mask_check.py, docs/performance.md)."""
    n = docs.numel() // block
    d = docs.view(n, block)
    lo, hi = d[:, 0], d[:, -1]
    i = torch.arange(n, device=docs.device, dtype=torch.int32)
    i32 = torch.int32
    first_any = (hi[None, :] < lo[:, None]).sum(-1, dtype=i32)  # row i: first j with hi[j] ≥ lo[i]
    first_full = (lo[None, :] < lo[:, None]).sum(-1, dtype=i32)  # row i: first j with lo[j] ≥ lo[i]
    last_any = (lo[None, :] <= hi[:, None]).sum(-1, dtype=i32) - 1  # column j: last i with lo[i] ≤ hi[j]
    last_full = (hi[None, :] <= lo[:, None]).sum(-1, dtype=i32) - 1  # column j: last i with hi[i] ≤ lo[j]
    single = lo == hi
    w_any = (window + (block - 1)) // block  # farthest block distance with some visible pair
    w_full = (window - (block - 1)) // block  # ... with every pair visible (floor; < 0 means none)
    zero = torch.zeros_like(i)
    # rows (key blocks per query block): partial = [a0, f0) ∪ {i} when full blocks exist, else [a0, i]
    a0 = torch.maximum(first_any, i - w_any)
    f0 = torch.maximum(first_full, i - w_full)
    nf = torch.where(single, (i - f0).clamp_min(0), zero)
    has = nf > 0
    rows_p = _span_index(a0, torch.where(has, f0 - a0, i - a0 + 1), i, has.to(i32), n)
    rows_f = _span_index(f0, nf, zero, zero, n)
    # columns (query blocks per key block): partial = {j} ∪ (f1, a1] when full blocks exist, else [j, a1]
    a1 = torch.minimum(last_any, i + w_any)
    f1 = torch.minimum(last_full, i + w_full)
    nfq = torch.where(single, (f1 - i).clamp_min(0), zero)
    hasq = nfq > 0
    cols_p = _span_index(i, torch.where(hasq, torch.ones_like(i), a1 - i + 1), f1 + 1,
                         torch.where(hasq, a1 - f1, zero), n)
    cols_f = _span_index(i + 1, nfq, zero, zero, n)
    return {"kv_num_blocks": rows_p[0], "kv_indices": rows_p[1], "full_kv_num_blocks": rows_f[0],
            "full_kv_indices": rows_f[1], "q_num_blocks": cols_p[0], "q_indices": cols_p[1],
            "full_q_num_blocks": cols_f[0], "full_q_indices": cols_f[1]}


def flex_block_mask(docs: Tensor, window: int | Tensor, block: int = MASK_BLOCK):
    """FlexAttention BlockMask for the document + causal + window rule; len(docs) % block == 0.

    Both orientations (key blocks per query block for the forward, query blocks per key block for
    the backward) come from block_spans, with no sort, scatter or search."""
    from torch.nn.attention.flex_attention import BlockMask

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (q - kv <= window) & (docs[q] == docs[kv])

    n = docs.numel()
    return BlockMask(seq_lengths=(n, n), **block_spans(docs, window, block), BLOCK_SIZE=(block, block),
                     mask_mod=mask_mod)


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


def build_mask(docs: Tensor | None, window: int | Tensor, backend: str, cu_seqlens: Tensor | None = None,
               max_seqlen: int = 0):
    """The mask of one window for one forward pass (built once, shared by the layers).

    "flex": a BlockMask (docs padded to a multiple of MASK_BLOCK with a fresh document id, so
    padded queries see only padded keys); the window may be a 0-d tensor, so that one compiled
    graph serves every window. "sdpa": (band_mask, window, chunk) for the banded path, which costs
    T·(chunk + window) instead of T². "fa4": (cu_seqlens, max_seqlen, window) for trainer.fa4 —
    the document boundaries come from the host (trainer.feed), the window as a 0-d CPU tensor."""
    if backend == "fa4":
        if cu_seqlens is None:
            raise ValueError("model.attn_backend='fa4' needs cu_seqlens (the document boundaries); "
                             "trainer.feed builds them on the host")
        return cu_seqlens, max_seqlen, window
    if backend == "flex":
        pad = (-docs.numel()) % MASK_BLOCK
        if pad:
            docs = torch.cat([docs, docs.new_full((pad,), 2**30)])
        return flex_block_mask(docs, window)
    if backend == "sdpa":
        chunk = _band_chunk(window)
        return band_mask(docs, window, chunk), window, chunk
    raise ValueError(f"model.attn_backend={backend!r} is invalid here: expected 'fa4', 'flex' or 'sdpa' "
                     "('auto' is resolved by the trainer before the model is built)")


def attend(q: Tensor, k: Tensor, v: Tensor, mask, backend: str, scale: float | Tensor) -> Tensor:
    """Masked attention of (T, H, D) q, k, v with a mask from build_mask; returns (T, H, D).

    `scale` multiplies the q·k scores inside the kernel, in fp32: a Python float, or a 0-d tensor
    (flex: on the device, applied by a score_mod; fa4: on the CPU) so that a compiled graph does
    not specialise on its value."""
    T, H, D = q.shape
    if backend == "fa4":
        from trainer.fa4 import fa4_attention

        cu_seqlens, max_seqlen, window = mask
        return fa4_attention(q, k, v, cu_seqlens, max_seqlen, window, scale)
    if backend == "sdpa":
        m, window, chunk = mask
        n = m.size(0)
        pad = n * chunk - T
        qc = F.pad(q, (0, 0, 0, 0, 0, pad)).view(n, chunk, H, D).transpose(1, 2)
        kc, vc = (F.pad(t, (0, 0, 0, 0, window, pad)).unfold(0, chunk + window, chunk).permute(0, 1, 3, 2)
                  for t in (k, v))  # (n, H, chunk + window, D)
        y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=m, scale=float(scale))
        return y.transpose(1, 2).reshape(n * chunk, H, D)[:T]
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    pad = (-T) % MASK_BLOCK
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    if isinstance(scale, Tensor):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score * scale

        y = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, scale=1.0)
    else:
        y = flex_attention(q, k, v, block_mask=mask, scale=float(scale))
    return y[0, :, :T].transpose(0, 1)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, docs: Tensor, window: int, scale: float) -> Tensor:
    """Plain SDPA with the full (T, T) mask: the slow reference the fast paths are tested against."""
    y = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                       attn_mask=dense_mask(docs, window), scale=scale)
    return y[0].transpose(0, 1)


__all__ = ["Rotary", "apply_rotary", "dense_mask", "block_classes", "block_spans", "flex_block_mask", "band_mask",
           "build_mask", "attend", "reference_attention"]

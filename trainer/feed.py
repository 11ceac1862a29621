"""Micro-batches onto the device, in the form the model's attention backend wants.

    feed = Feed(cfg.model.attn_backend, device, max_seqlen=cfg.data.train_max_seq_len)
    b = feed(loader.next_batch(T))            # DeviceBatch(inputs, targets, docs, cu_seqlens, max_seqlen)
    loss = model(b.inputs, b.targets, b.docs, long, short, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)

The host→device copy is asynchronous: tensors are staged in pinned memory (PyTorch's caching host
allocator, which keeps a block until the copy that reads it has finished) and copied with
non_blocking=True, so the copy of the next micro-batch overlaps the device work already queued.
Nothing here waits for the device.

fa4 gets the document boundaries instead of per-token document ids: `cu_seqlens` is computed on
the host from the batch (NumPy, ~0.1 ms for 48k tokens) and padded with T to a fixed length, so
one compiled graph serves every batch of a shape (the records do the same: 128-multiples of
T/300). A batch with more documents than that grows the length to the next multiple of 128 — one
recompile, said on stderr. `max_seqlen` bounds every document (it sizes the kernel's grid):
data.train_max_seq_len for BOS-aligned training batches, whose documents the loader clips to it,
and T for validation batches and unaligned streams.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.data import Batch

CU_MULTIPLE = 128  # cu_seqlens lengths are multiples of this
DOC_LEN_HINT = 300  # initial capacity: T / DOC_LEN_HINT documents (the records' choice)


class DeviceBatch(NamedTuple):
    inputs: Tensor
    targets: Tensor
    docs: Tensor | None  # document id per position (flex, sdpa)
    cu_seqlens: Tensor | None  # int32 boundaries padded with T (fa4)
    max_seqlen: int  # bound on document length (fa4; 0 otherwise)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def doc_bounds(docs: np.ndarray) -> np.ndarray:
    """[0, b1, ..., T]: the positions where the document id changes, with both ends (int32)."""
    T = docs.size
    inner = np.flatnonzero(docs[1:] != docs[:-1]).astype(np.int32) + 1
    return np.concatenate(([0], inner, [T])).astype(np.int32)


class Feed:
    """Callable: Batch → DeviceBatch for one backend and device (see the module docstring)."""

    def __init__(self, backend: str, device: torch.device, max_seqlen: int, aligned: bool = True) -> None:
        self.backend, self.device = backend, device
        self.max_seqlen, self.aligned = max_seqlen, aligned
        self._cu_len: dict[int, int] = {}  # T → cu_seqlens length in use

    def _tensor(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def cu_length(self, T: int, n_docs: int) -> int:
        """The cu_seqlens length for micro-batches of T tokens, grown (once per new maximum) to fit n_docs."""
        cur = self._cu_len.get(T) or _round_up(max(T // DOC_LEN_HINT, 1) + 1, CU_MULTIPLE)
        if n_docs + 1 > cur:
            new = _round_up(n_docs + 1, CU_MULTIPLE)
            print(f"[trainer.feed] a {T}-token micro-batch holds {n_docs} documents, more than cu_seqlens "
                  f"({cur} entries) fits: growing it to {new} (one recompile of the model)", file=sys.stderr)
            cur = new
        self._cu_len[T] = cur
        return cur

    def __call__(self, batch: Batch, *, eval_shape: bool = False, cu_len: int | None = None) -> DeviceBatch:
        """One micro-batch on the device. eval_shape: a validation batch (not BOS-aligned, so
        max_seqlen = T); cu_len fixes the cu_seqlens length (validation batches share one)."""
        x, y = self._tensor(batch.inputs), self._tensor(batch.targets)
        T = batch.docs.size
        if self.backend != "fa4":
            return DeviceBatch(x, y, self._tensor(batch.docs), None, 0)
        bounds = doc_bounds(batch.docs)
        n_docs = bounds.size - 1
        length = cu_len if cu_len is not None else self.cu_length(T, n_docs)
        cu = np.full(length, T, dtype=np.int32)
        cu[:bounds.size] = bounds
        bound = T if (eval_shape or not self.aligned) else min(T, self.max_seqlen)
        longest = int(np.diff(bounds).max()) if n_docs else 0
        if longest > bound:  # the loader clips aligned documents; a bigger one is a bug, not data
            raise RuntimeError(f"a training document of {longest} tokens exceeds max_seqlen={bound} "
                               "(data.train_max_seq_len); the fa4 kernel would skip part of it")
        return DeviceBatch(x, y, None, self._tensor(cu), bound)

    def eval_batches(self, batches: list[Batch]) -> list[DeviceBatch]:
        """Validation batches on the device, sharing one cu_seqlens length (one compiled shape)."""
        length = 0
        if self.backend == "fa4" and batches:
            length = _round_up(max(doc_bounds(b.docs).size for b in batches), CU_MULTIPLE)
        return [self(b, eval_shape=True, cu_len=length or None) for b in batches]


__all__ = ["Feed", "DeviceBatch", "doc_bounds", "CU_MULTIPLE"]

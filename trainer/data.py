"""Token shards: reader, BOS-aligned training batches, validation batches, synthetic generator.

Shard format (upstream): 256 int32 header ([0]=20240520 magic, [1]=1 version, [2]=ntokens),
then ntokens uint16 tokens; files `<dir>/fineweb_train_000001.bin ...`, `<dir>/fineweb_val_000000.bin`.

    python -m trainer.data synth --out data/synth-tiny --train-tokens 2000000 --val-tokens 32768 --vocab 512
    python -m trainer.data fineweb --out data/fineweb10B --train-shards 9     # needs network
    python -m pytest tests/trainer/test_data.py -q

Training batches (one flat packed sequence per rank and micro-batch): documents start at BOS,
each is clipped to data.train_max_seq_len, and documents are packed until exactly T+1 tokens
(the last one cut; the rest of it is skipped); ranks take consecutive sequences of one global
stream, so rank r of W gets what micro-batch r of one rank would get. Document order
(data.order): "file" reads documents in file order, the same stream for every seed, with the
records' shard boundary rule (the sequences of one optimizer step, reference_world_size of them,
never span two shards: a step that does not fit in what is left of a shard starts at the next
shard's first document); "shuffled" permutes each shard's documents by the run seed and packs
across shard ends.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "synth.json"
_FIX = ("regenerate it (`python -m trainer.data synth --out DIR ...`, or delete the directory and let "
        "the trainer regenerate synthetic data) or re-download it (`python -m trainer.data fineweb`)")


class DataError(ValueError):
    """Missing or malformed data: the message names the file or setting and the fix."""


# --------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------
def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header = np.frombuffer(fh.read(HEADER_BYTES), dtype=np.int32)
    except OSError as e:
        raise DataError(f"shard {path} cannot be read: {e.strerror}") from None
    if header.size < HEADER_INTS:
        raise DataError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header; {_FIX}")
    if header[0] != MAGIC:
        raise DataError(f"shard {path} has magic number {int(header[0])}, expected {MAGIC}: "
                        f"not a token shard; {_FIX}")
    if header[1] != VERSION:
        raise DataError(f"shard {path} has version {int(header[1])}, expected {VERSION}; {_FIX}")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise DataError(f"shard {path} header says {n} tokens ({HEADER_BYTES + 2 * n} bytes) but the file "
                        f"is {size} bytes: truncated or corrupt; {_FIX}")
    return n


def load_shard(path: str | Path, count: int | None = None) -> np.ndarray:
    """The shard's tokens (uint16), validated; the first `count` only when given."""
    n = read_header(path)
    count = n if count is None else min(n, count)
    with open(path, "rb") as fh:
        fh.seek(HEADER_BYTES)
        tokens = np.fromfile(fh, dtype=np.uint16, count=count)
    if tokens.size != count:
        raise DataError(f"shard {path} ended after {tokens.size} of {count} tokens; {_FIX}")
    return tokens


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens (< 65536) in the upstream format, atomically (temp file + rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise DataError(f"{path}: tokens must fit uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(header.tobytes())
            fh.write(tokens.astype(np.uint16, copy=False).tobytes())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def list_shards(data_dir: str | Path, pattern: str) -> list[Path]:
    return [Path(p) for p in sorted(glob.glob(os.path.join(str(data_dir), pattern)))]


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One rank's micro-batch: a flat sequence of T tokens."""

    inputs: np.ndarray  # int64 (T,)
    targets: np.ndarray  # int64 (T,)
    docs: np.ndarray  # int32 (T,): document id per position (increments at each BOS)


def make_batch(buf: np.ndarray, bos_id: int) -> Batch:
    """Batch from T+1 consecutive tokens: inputs buf[:-1], targets buf[1:], docs from BOS positions."""
    inputs = buf[:-1].astype(np.int64)
    return Batch(inputs=inputs, targets=buf[1:].astype(np.int64),
                 docs=np.cumsum(inputs == bos_id, dtype=np.int32))


@dataclass
class _Shard:
    tokens: np.ndarray  # uint16
    starts: np.ndarray  # int64: start of each document, in visiting order
    lens: np.ndarray  # int64: clipped length of each document, in visiting order
    cum: np.ndarray  # int64: cum[i] = sum(lens[:i]), length n_docs + 1


def _index_shard(path: Path, bos_id: int, max_seq_len: int, seed: int, epoch: int, idx: int,
                 shuffle: bool) -> _Shard:
    tokens = load_shard(path)
    if tokens.size < 2:
        raise DataError(f"shard {path} holds {tokens.size} tokens; a training shard needs at least 2")
    starts = np.flatnonzero(tokens == bos_id).astype(np.int64)
    if starts.size == 0:
        raise DataError(f"shard {path} holds no BOS token ({bos_id}); check data.bos_id")
    lens = np.diff(np.append(starts, tokens.size))
    np.minimum(lens, max_seq_len, out=lens)
    if shuffle:
        order = np.random.default_rng([seed, epoch, idx]).permutation(starts.size)
        starts, lens = starts[order], lens[order]
    cum = np.zeros(starts.size + 1, dtype=np.int64)
    np.cumsum(lens, out=cum[1:])
    return _Shard(tokens, starts, lens, cum)


ORDERS = ("file", "shuffled")


class TrainLoader:
    """Training micro-batches for one rank of `world_size` (see the module docstring).

    `next_batch(T)` consumes one packed sequence of T+1 tokens per rank of the global stream and
    returns this rank's. Deterministic in (files, order, seed if shuffled, world-independent
    stream). `group` (order "file") is the number of sequences of one optimizer step over all
    ranks and micro-batches (runtime.reference_world_size); a step's group never spans two shards,
    as in the records' 8-GPU loader. With align_bos=False sequences are plain consecutive windows
    of the shards instead.
    """

    def __init__(self, files: list[Path], *, bos_id: int, max_seq_len: int, rank: int, world_size: int,
                 seed: int, align_bos: bool = True, order: str = "file", group: int | None = None) -> None:
        if not files:
            raise DataError("TrainLoader needs at least one training shard")
        if order not in ORDERS:
            raise DataError(f"data.order={order!r} is invalid: choose one of {', '.join(ORDERS)}")
        group = world_size if group is None else group
        if group < world_size or group % world_size:
            raise DataError(f"TrainLoader group={group} must be a multiple of world_size={world_size}")
        self.files, self.bos_id, self.max_seq_len = list(files), bos_id, max_seq_len
        self.rank, self.world_size, self.seed, self.align_bos = rank, world_size, seed, align_bos
        self.order, self.group = order, group
        self._in_group = 0  # sequences of the current group already taken (order "file")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._epoch, self._idx = 0, 0
        self._next = self._submit(0, 0)
        self._shard: _Shard | None = None
        self._cursor = 0  # next document (aligned) or next token (unaligned)
        self._warned = False
        self._advance()

    def _submit(self, epoch: int, idx: int) -> concurrent.futures.Future:
        return self._pool.submit(_index_shard, self.files[idx], self.bos_id, self.max_seq_len,
                                 self.seed, epoch, idx, self.align_bos and self.order == "shuffled")

    def _advance(self) -> None:
        self._shard = self._next.result()
        self._cursor = 0
        nxt_epoch, nxt_idx = self._epoch, self._idx + 1
        if nxt_idx == len(self.files):
            nxt_epoch, nxt_idx = self._epoch + 1, 0
        self._next = self._submit(nxt_epoch, nxt_idx)
        self._cur_epoch, self._epoch, self._idx = self._epoch, nxt_epoch, nxt_idx
        if self._cur_epoch > 0 and not self._warned:
            again = "with a new document order" if self.order == "shuffled" else "in the same order (data.order=file)"
            print(f"[trainer.data] training data exhausted after {len(self.files)} shard(s); starting "
                  f"epoch {self._cur_epoch} {again}", file=sys.stderr)
            self._warned = True

    def _take(self, need: int, keep: bool) -> np.ndarray | None:
        """Consume `need` tokens of packed documents; return them when keep."""
        pieces: list[np.ndarray] = []
        while need > 0:
            sh = self._shard
            if self.align_bos:
                n_docs = sh.starts.size
                if self._cursor >= n_docs:
                    self._advance()
                    continue
                c = self._cursor
                m = int(np.searchsorted(sh.cum, sh.cum[c] + need, side="left"))
                if m > n_docs:  # not enough documents left in this shard
                    m = n_docs
                starts, lens = sh.starts[c:m], sh.lens[c:m].copy()
                got = int(lens.sum())
                if got > need:
                    lens[-1] -= got - need
                    got = need
                if keep:
                    offs = np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
                    pieces.append(sh.tokens[offs + np.arange(got)])
                self._cursor, need = m, need - got
            else:
                left = sh.tokens.size - self._cursor
                if left <= 0:
                    self._advance()
                    continue
                got = min(left, need)
                if keep:
                    pieces.append(sh.tokens[self._cursor:self._cursor + got])
                self._cursor, need = self._cursor + got, need - got
        return np.concatenate(pieces) if keep else None

    def _fits(self, need: int, count: int) -> bool:
        """Whether `count` sequences of `need` tokens can still be packed from the current shard."""
        sh, c = self._shard, self._cursor
        for _ in range(count):
            m = int(np.searchsorted(sh.cum, sh.cum[c] + need, side="left"))
            if m > sh.starts.size:
                return False
            c = m  # the last document is cut; its rest is skipped
        return True

    def _start_group(self, tokens_local: int) -> None:
        """Order "file": move to the next shard unless the whole step's group fits in this one."""
        for _ in range(len(self.files) + 1):
            if self._fits(tokens_local + 1, self.group):
                return
            self._advance()
        raise DataError(f"no training shard holds one step of {self.group} sequences of {tokens_local + 1} "
                        f"tokens ({self.files[0].parent}); use larger shards or a smaller batch")

    def next_batch(self, tokens_local: int) -> Batch:
        if self.order == "file" and self.align_bos:
            if self._in_group == 0:
                self._start_group(tokens_local)
            self._in_group = (self._in_group + self.world_size) % self.group
        mine: np.ndarray | None = None
        for r in range(self.world_size):
            if self.align_bos:
                buf = self._take(tokens_local + 1, keep=r == self.rank)
            else:  # consecutive windows overlap by one token (the last target)
                buf = self._take(tokens_local, keep=r == self.rank)
                if r == self.rank:
                    extra = self._peek()
                    buf = np.append(buf, extra)
            if r == self.rank:
                mine = buf
        return make_batch(mine, self.bos_id)

    def _peek(self) -> np.ndarray:
        sh = self._shard
        if self._cursor < sh.tokens.size:
            return sh.tokens[self._cursor:self._cursor + 1]
        return self._next.result().tokens[:1]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def val_batches(files: list[Path], *, val_tokens: int, tokens_per_forward: int, rank: int,
                world_size: int, bos_id: int) -> list[Batch]:
    """This rank's validation forwards over the first val_tokens tokens (not BOS-aligned).

    The stream is cut into val_tokens // tokens_per_forward chunks; rank r takes chunks
    r, r+W, r+2W, ... Each chunk needs one extra token for its last target, so the val shards
    must hold at least val_tokens + 1 tokens.
    """
    if not files:
        raise DataError("no validation shards")
    need = val_tokens + 1
    parts, have = [], 0
    for f in files:
        t = load_shard(f, need - have)
        parts.append(t)
        have += t.size
        if have >= need:
            break
    if have < need:
        raise DataError(f"validation shards {', '.join(map(str, files))} hold {have} tokens; eval.val_tokens="
                        f"{val_tokens} needs {need} (one extra for the last target). Lower eval.val_tokens "
                        f"or provide more validation data (synthetic: raise data.synth.val_tokens and "
                        f"delete the data directory so it is regenerated)")
    stream = np.concatenate(parts)
    n_chunks = val_tokens // tokens_per_forward
    T = tokens_per_forward
    return [make_batch(stream[c * T:(c + 1) * T + 1], bos_id) for c in range(rank, n_chunks, world_size)]


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------
_CHUNK = 1 << 20  # tokens generated per vectorised chunk (independent of shard and total size)
_BRANCH_P = np.array([0.55, 0.25, 0.12, 0.08])  # successor-branch probabilities (bigram structure)
_P_RESET = 0.3  # probability that a token is drawn fresh instead of from the bigram chain
_P_TOPIC = 0.4  # probability that a fresh token comes from the document's topic words
_N_TOPICS, _TOPIC_WORDS = 512, 32
_SUCC_ZIPF = 0.6  # successors follow a flatter Zipf (exponent 0.6·a) so the chain keeps the vocabulary busy
_DOC_SIGMA = 1.0  # lognormal spread of document lengths


class _Alias:
    """Walker alias table: vectorised O(1) sampling from a fixed discrete distribution."""

    def __init__(self, p: np.ndarray) -> None:
        n = p.size
        q = p * n / p.sum()
        alias = np.zeros(n, dtype=np.int64)
        small = [i for i in range(n) if q[i] < 1.0]
        large = [i for i in range(n) if q[i] >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            alias[s] = g
            q[g] -= 1.0 - q[s]
            (small if q[g] < 1.0 else large).append(g)
        for i in small + large:
            q[i] = 1.0
        self.q, self.alias = q.astype(np.float32), alias

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        i = rng.integers(0, self.q.size, n)
        keep = rng.random(n, dtype=np.float32) < self.q[i]
        return np.where(keep, i, self.alias[i])


@dataclass
class _Language:
    """The fixed structure shared by train and val streams of one synthetic data set."""

    rank_to_token: np.ndarray  # content token ids by Zipf rank
    zipf: _Alias
    succ: np.ndarray  # (branches, vocab) successor token of each token per branch
    topic_words: np.ndarray  # (_N_TOPICS, _TOPIC_WORDS)
    topic_cdf: np.ndarray
    branch_cdf: np.ndarray


def _language(vocab: int, bos_id: int, seed: int, zipf_a: float) -> _Language:
    rng = np.random.default_rng([seed, 0])
    content = np.array([t for t in range(vocab) if t != bos_id], dtype=np.int64)
    rank_to_token = rng.permutation(content)
    n = content.size
    zipf = _Alias(1.0 / np.arange(1, n + 1, dtype=np.float64) ** zipf_a)
    flat = _Alias(1.0 / np.arange(1, n + 1, dtype=np.float64) ** (_SUCC_ZIPF * zipf_a))
    succ = np.zeros((_BRANCH_P.size, vocab), dtype=np.int64)
    for b in range(_BRANCH_P.size):
        succ[b] = rank_to_token[flat.sample(rng, vocab)]
    lo = min(10, n - 1)
    topic_words = rank_to_token[rng.integers(lo, n, (_N_TOPICS, _TOPIC_WORDS))]
    tp = 1.0 / np.arange(1, _TOPIC_WORDS + 1) ** 1.0
    return _Language(rank_to_token, zipf, succ, topic_words, np.cumsum(tp / tp.sum()),
                     np.cumsum(_BRANCH_P / _BRANCH_P.sum()))


def _chunk(lang: _Language, rng: np.random.Generator, n: int, bos_id: int, mean_doc_len: int) -> np.ndarray:
    """n tokens of BOS-separated documents (the last one cut at the chunk end)."""
    mu = np.log(max(mean_doc_len, 2)) - _DOC_SIGMA ** 2 / 2
    lens_parts, total = [], 0
    while total < n:
        ls = np.clip(np.rint(rng.lognormal(mu, _DOC_SIGMA, 2 * n // max(mean_doc_len, 2) + 16)),
                     2, 16 * mean_doc_len).astype(np.int64)
        lens_parts.append(ls)
        total += int(ls.sum())
    lens = np.concatenate(lens_parts)
    ends = np.cumsum(lens)
    n_docs = int(np.searchsorted(ends, n, side="left")) + 1
    starts = np.concatenate(([0], ends[:n_docs - 1]))
    doc_start = np.zeros(n, dtype=bool)
    doc_start[starts] = True
    doc_of = np.cumsum(doc_start) - 1
    topic = rng.integers(0, _N_TOPICS, n_docs)[doc_of]
    # Positions drawn fresh: BOS, the token after BOS, and a random _P_RESET fraction.
    fresh = rng.random(n, dtype=np.float32) < _P_RESET
    fresh[starts] = True
    after = starts + 1
    fresh[after[after < n]] = True
    tok = np.empty(n, dtype=np.int64)
    idx = np.flatnonzero(fresh)
    from_topic = rng.random(idx.size, dtype=np.float32) < _P_TOPIC
    words = np.searchsorted(lang.topic_cdf, rng.random(idx.size), side="right")
    np.minimum(words, _TOPIC_WORDS - 1, out=words)
    zipf_tok = lang.rank_to_token[lang.zipf.sample(rng, idx.size)]
    tok[idx] = np.where(from_topic, lang.topic_words[topic[idx], words], zipf_tok)
    tok[starts] = bos_id
    # Bigram chain: every other token is a successor of the previous one, on one of a few branches.
    branch = np.searchsorted(lang.branch_cdf, rng.random(n, dtype=np.float32), side="right")
    np.minimum(branch, _BRANCH_P.size - 1, out=branch)
    active = np.flatnonzero(~fresh[1:] & fresh[:-1]) + 1  # chain heads: non-fresh after fresh
    while active.size:
        tok[active] = lang.succ[branch[active], tok[active - 1]]
        active = active + 1
        active = active[active < n]
        active = active[~fresh[active]]
    return tok


def synth_stream(n_tokens: int, *, vocab: int, bos_id: int, seed: int, stream: int, mean_doc_len: int,
                 zipf_a: float) -> Iterator[np.ndarray]:
    """Yield chunks (uint16) of a deterministic synthetic token stream; stream 1 = train, 2 = val.

    A prefix of the stream does not depend on n_tokens."""
    lang = _language(vocab, bos_id, seed, zipf_a)
    done, c = 0, 0
    while done < n_tokens:
        n = min(_CHUNK, n_tokens - done)
        rng = np.random.default_rng([seed, stream, c])
        yield _chunk(lang, rng, _CHUNK, bos_id, mean_doc_len)[:n].astype(np.uint16)  # full chunk: prefix-stable
        done, c = done + n, c + 1


def _write_stream(out: Path, prefix: str, first_index: int, n_tokens: int, shard_tokens: int,
                  **kw) -> list[Path]:
    paths, buf, have, idx = [], [], 0, first_index

    def flush(parts: list[np.ndarray]) -> None:
        nonlocal idx
        p = out / f"{prefix}_{idx:06d}.bin"
        write_shard(p, np.concatenate(parts))
        paths.append(p)
        idx += 1

    for chunk in synth_stream(n_tokens, **kw):
        while chunk.size:
            take = min(chunk.size, shard_tokens - have)
            buf.append(chunk[:take])
            have += take
            chunk = chunk[take:]
            if have == shard_tokens:
                flush(buf)
                buf, have = [], 0
    if have:
        flush(buf)
    return paths


def write_synthetic(out_dir: str | Path, *, train_tokens: int, val_tokens: int, vocab: int, bos_id: int,
                    seed: int = 1234, mean_doc_len: int = 600, zipf_a: float = 1.1,
                    shard_tokens: int = 100_000_000) -> dict:
    """Generate train shards (train_tokens in total) and one val shard of val_tokens + 1 tokens
    (val_tokens predictable targets) into out_dir; write the manifest last. Returns the manifest."""
    if not 2 <= vocab <= 65536:
        raise DataError(f"vocab={vocab} is invalid: synthetic shards store uint16 tokens, need 2..65536")
    if not 0 <= bos_id < vocab:
        raise DataError(f"bos={bos_id} is invalid: must be in [0, vocab={vocab})")
    if min(train_tokens, val_tokens, shard_tokens) < 1:
        raise DataError("train_tokens, val_tokens and shard_tokens must be ≥ 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(vocab=vocab, bos_id=bos_id, seed=seed, mean_doc_len=mean_doc_len, zipf_a=zipf_a)
    t0 = time.perf_counter()
    _write_stream(out, "fineweb_val", 0, val_tokens + 1, max(shard_tokens, val_tokens + 1), stream=2, **kw)
    _write_stream(out, "fineweb_train", 1, train_tokens, shard_tokens, stream=1, **kw)
    manifest = synth_manifest(train_tokens=train_tokens, val_tokens=val_tokens, shard_tokens=shard_tokens, **kw)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[trainer.data] wrote {train_tokens + val_tokens + 1:,} synthetic tokens to {out} in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return manifest


def synth_manifest(**kw) -> dict:
    return {"format": 1, **{k: kw[k] for k in sorted(kw)}}


def ensure_data(data_dir: str | Path, *, train_pattern: str, val_pattern: str, synthetic: bool,
                synth: dict) -> tuple[list[Path], list[Path]]:
    """(train files, val files) of data_dir; generate synthetic shards first when asked and none exist.

    Generation is guarded by an fcntl lock on `<data_dir>/.synth.lock`, so ranks and concurrent
    runs share one generation; files land by rename. `synth` holds write_synthetic's keywords.
    Existing synthetic data whose manifest differs from `synth` is an error (stale cache)."""
    d = Path(data_dir)

    def found() -> tuple[list[Path], list[Path]]:
        return list_shards(d, train_pattern), list_shards(d, val_pattern)

    train, val = found()
    if synthetic and not (train and val):
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".synth.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                train, val = found()
                if not (train and val):
                    print(f"[trainer.data] no shards in {d}; generating synthetic data "
                          f"({synth['train_tokens']:,} train tokens)", file=sys.stderr)
                    tmp = Path(tempfile.mkdtemp(dir=d, prefix=".synth-"))
                    try:
                        write_synthetic(tmp, **synth)
                        for p in sorted(tmp.iterdir()):  # shards first, manifest last
                            if p.name != MANIFEST:
                                os.replace(p, d / p.name)
                        os.replace(tmp / MANIFEST, d / MANIFEST)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
                    train, val = found()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if synthetic and (d / MANIFEST).exists():
        have = json.loads((d / MANIFEST).read_text())
        want = synth_manifest(**synth)
        if have != want:
            diff = ", ".join(f"{k}: {have.get(k)!r} on disk vs {want.get(k)!r} configured"
                             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
            raise DataError(f"synthetic data in {d} (data.data_dir) was generated with other settings "
                            f"({diff}); delete {d} to regenerate, or set data.data_dir to a new directory")
    if not train:
        raise DataError(f"no training shards matching {train_pattern!r} in {d} (data.data_dir); download "
                        f"FineWeb with `python -m trainer.data fineweb --out {d} --train-shards 9`, point "
                        f"data.data_dir at existing shards, or train on synthetic data with "
                        f"data.synthetic=true (and e.g. data.data_dir=data/synth-speedrun)")
    if not val:
        raise DataError(f"no validation shards matching {val_pattern!r} in {d} (data.data_dir); "
                        f"add fineweb_val_000000.bin there or set data.synthetic=true with an empty directory")
    return train, val


def data_provenance(data_dir: str | Path, train: list[Path], val: list[Path]) -> dict:
    """What a run reads: {"dir", "synthetic", "hash", "train_shards", "val_shards", "train_tokens"}.

    `synthetic` is whether data_dir holds the synthetic generator's manifest (synth.json), i.e.
    what the shards are, whatever data.synthetic says. `hash` (16 hex digits) covers every shard's
    file name, 1024-byte header (magic, version, token count) and first 4096 tokens: cheap to
    compute, and different for FineWeb, for synthetic data of other settings, or for a different
    set of shards."""
    h = hashlib.sha256()
    tokens = 0
    for kind, files in (("train", train), ("val", val)):
        for f in files:
            with open(f, "rb") as fh:
                head = fh.read(HEADER_BYTES + 2 * 4096)
            h.update(f"{kind}:{Path(f).name}:".encode())
            h.update(head)
            if kind == "train":
                tokens += int(np.frombuffer(head[:HEADER_BYTES], dtype=np.int32)[2])
    d = Path(data_dir)
    return {"dir": str(d.resolve()), "synthetic": (d / MANIFEST).exists(), "hash": h.hexdigest()[:16],
            "train_shards": len(train), "val_shards": len(val), "train_tokens": tokens}


# --------------------------------------------------------------------------------------------
# FineWeb download (documented helper; not exercised in CI)
# --------------------------------------------------------------------------------------------
FINEWEB_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/{name}"


def download_fineweb(out_dir: str | Path, train_shards: int) -> None:
    """Fetch fineweb_val_000000.bin and fineweb_train_000001..N.bin (GPT-2 tokens, 100M each)."""
    import urllib.request

    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"{out} holds synthetic shards ({MANIFEST}); download FineWeb into another directory "
                        f"or delete {out} first (its shards would otherwise pass for FineWeb)")
    out.mkdir(parents=True, exist_ok=True)
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]
    for name in names:
        dest = out / name
        if dest.exists():
            read_header(dest)
            continue
        print(f"[trainer.data] downloading {name}", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        os.close(fd)
        try:
            urllib.request.urlretrieve(FINEWEB_URL.format(name=name), tmp)
            read_header(tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from trainer.config import SynthConfig

    d = SynthConfig()
    ap = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write learnable synthetic shards in the upstream format")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train-tokens", type=int, required=True, help="total training tokens")
    s.add_argument("--val-tokens", type=int, required=True,
                   help="validation targets; the val shard holds this + 1 tokens (≥ eval.val_tokens)")
    s.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default GPT-2's 50257)")
    s.add_argument("--bos", type=int, default=None, help="BOS token id (default vocab - 1)")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--mean-doc-len", type=int, default=d.mean_doc_len)
    s.add_argument("--zipf-a", type=float, default=d.zipf_a)
    s.add_argument("--shard-tokens", type=int, default=d.shard_tokens, help="tokens per train shard")
    f = sub.add_parser("fineweb", help="download GPT-2-tokenized FineWeb shards (needs network)")
    f.add_argument("--out", required=True)
    f.add_argument("--train-shards", type=int, default=9, help="100M-token train shards to fetch")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "synth":
            write_synthetic(args.out, train_tokens=args.train_tokens, val_tokens=args.val_tokens,
                            vocab=args.vocab, bos_id=args.vocab - 1 if args.bos is None else args.bos,
                            seed=args.seed, mean_doc_len=args.mean_doc_len, zipf_a=args.zipf_a,
                            shard_tokens=args.shard_tokens)
        else:
            download_fineweb(args.out, args.train_shards)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shards, training/validation batches and the synthetic generator.

    python -m pytest tests/trainer/test_data.py -q
"""
import json
import multiprocessing as mp

import numpy as np
import pytest

from trainer.data import (HEADER_BYTES, MAGIC, DataError, TrainLoader, ensure_data, list_shards, load_shard,
                          read_header, synth_stream, val_batches, write_shard, write_synthetic)

BOS = 511


def _docs_shard(path, n_docs=300, seed=0, bos=BOS, max_len=400):
    """A shard whose document i is [BOS, i, i, ...] (token i % 500): every segment is traceable."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, max_len, n_docs)
    toks = np.concatenate([np.r_[bos, np.full(n - 1, i % 500)] for i, n in enumerate(lens)])
    write_shard(path, toks)
    return toks, lens


# -- shard files -----------------------------------------------------------------------------
def test_shard_round_trip(tmp_path):
    toks = np.arange(1000, dtype=np.int64) % 65536
    p = tmp_path / "fineweb_train_000001.bin"
    write_shard(p, toks)
    assert read_header(p) == 1000
    assert p.stat().st_size == HEADER_BYTES + 2000
    np.testing.assert_array_equal(load_shard(p), toks.astype(np.uint16))
    np.testing.assert_array_equal(load_shard(p, count=10), toks[:10])


@pytest.mark.parametrize("damage,needle", [
    ("magic", "magic number 1234"), ("version", "version 7"), ("truncate", "truncated"), ("short", "shorter"),
])
def test_malformed_shard_errors_name_file_and_fix(tmp_path, damage, needle):
    p = tmp_path / "fineweb_val_000000.bin"
    write_shard(p, np.arange(100))
    raw = bytearray(p.read_bytes())
    if damage == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif damage == "truncate":
        raw = raw[:-10]
    else:
        raw = raw[:100]
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_shard(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg
    assert "python -m trainer.data" in msg  # the fix


def test_write_shard_rejects_out_of_range(tmp_path):
    with pytest.raises(DataError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([70000]))


# -- training batches ------------------------------------------------------------------------
def _segments(inputs, bos=BOS):
    starts = np.flatnonzero(inputs == bos)
    return [inputs[a:b] for a, b in zip(starts, list(starts[1:]) + [len(inputs)])]


def test_bos_aligned_packing(tmp_path):
    _docs_shard(tmp_path / "fineweb_train_000001.bin")
    files = list_shards(tmp_path, "fineweb_train_*.bin")
    ld = TrainLoader(files, bos_id=BOS, max_seq_len=64, rank=0, world_size=1, seed=0)
    try:
        for _ in range(5):
            b = ld.next_batch(255)
            assert b.inputs.shape == b.targets.shape == b.docs.shape == (255,)
            assert b.inputs[0] == BOS
            np.testing.assert_array_equal(b.inputs[1:], b.targets[:-1])
            for seg in _segments(b.inputs):
                assert len(seg) <= 64  # clipped to train_max_seq_len
                assert len(set(seg[1:].tolist())) <= 1  # one document's tokens, contiguous
            # document ids increment exactly at BOS
            np.testing.assert_array_equal(b.docs, np.cumsum(b.inputs == BOS))
    finally:
        ld.close()


@pytest.mark.parametrize("order", ["file", "shuffled"])
def test_loader_deterministic_and_seeded(tmp_path, order):
    """data.order: "file" gives every seed the same stream, "shuffled" makes the seed permute it."""
    _docs_shard(tmp_path / "fineweb_train_000001.bin")
    files = list_shards(tmp_path, "fineweb_train_*.bin")

    def take(seed, rank=0, world=1, n=3):
        ld = TrainLoader(files, bos_id=BOS, max_seq_len=128, rank=rank, world_size=world, seed=seed, order=order,
                         group=2)
        try:
            return [ld.next_batch(200).inputs for _ in range(n)]
        finally:
            ld.close()

    a, b, c = take(0), take(0), take(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    if order == "shuffled":
        assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    else:
        for x, y in zip(a, c):
            np.testing.assert_array_equal(x, y)
        # file order: documents 0, 1, 2, ... (document i is [BOS, i, i, ...])
        firsts = [int(seg[1]) for seg in _segments(a[0]) if len(seg) > 1]
        assert firsts == list(range(len(firsts)))
    # rank r of 2 gets what micro-batch r of a single rank gets; ranks differ
    single = take(0, n=4)
    r0, r1 = take(0, rank=0, world=2, n=2), take(0, rank=1, world=2, n=2)
    np.testing.assert_array_equal(r0[0], single[0])
    np.testing.assert_array_equal(r1[0], single[1])
    np.testing.assert_array_equal(r0[1], single[2])
    np.testing.assert_array_equal(r1[1], single[3])
    assert not np.array_equal(r0[0], r1[0])


def _upstream_stream(files, T, world, steps, max_len=2048, bos=BOS):
    """The records' BOS-aligned loader (BOSFinder.next_batch + its shard switch), transcribed:
    per step, for each rank r, documents from the current BOS on, each cut at max_len and the
    last at the remaining length, until T+1 tokens; a step that runs out of documents is thrown
    away and restarted at the next shard's first document. Returns steps × world token arrays."""
    out, it = [], iter(files)
    tokens = load_shard(next(it)).astype(np.int64)
    bos_idx, i = np.flatnonzero(tokens == bos), 0
    while len(out) < steps:
        seqs, idx, ok = [], i, True
        for _ in range(world):
            parts, cur_len = [], 0
            while cur_len <= T:
                if idx >= len(bos_idx):
                    ok = False
                    break
                cur = bos_idx[idx]
                nxt = bos_idx[idx + 1] if idx + 1 < len(bos_idx) else tokens.size
                end = min(nxt, cur + max_len, cur + T - cur_len + 1)
                parts.append(tokens[cur:end])
                cur_len += end - cur
                idx += 1
            if not ok:
                break
            seqs.append(np.concatenate(parts))
        if not ok:
            tokens = load_shard(next(it)).astype(np.int64)
            bos_idx, i = np.flatnonzero(tokens == bos), 0
            continue
        i = idx
        out.append(seqs)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_file_order_is_the_records_stream_across_shards(tmp_path, world):
    """order "file" with group = 4 (a reference world size of 4) reproduces the records' 4-GPU
    loader sequence for sequence over 3 shards, at world size 1, 2 and 4 (4/world micro-batches per
    step), including the shard switches that throw away a shard's tail. "shuffled" does not."""
    for k in range(3):  # document j of shard k is [BOS, 100k + j, ...]
        lens = np.random.default_rng(k).integers(2, 300, 60)
        write_shard(tmp_path / f"fineweb_train_00000{k + 1}.bin",
                    np.concatenate([np.r_[BOS, np.full(n - 1, 100 * k + j)] for j, n in enumerate(lens)]))
    files = list_shards(tmp_path, "fineweb_train_*.bin")
    T, steps = 255, 12
    want = _upstream_stream(files, T, 4, steps, max_len=128)
    got = [[None] * 4 for _ in range(steps)]
    for rank in range(world):
        ld = TrainLoader(files, bos_id=BOS, max_seq_len=128, rank=rank, world_size=world, seed=0, order="file", group=4)
        try:
            for step in range(steps):
                for micro in range(4 // world):
                    got[step][micro * world + rank] = ld.next_batch(T).inputs
        finally:
            ld.close()
    for step in range(steps):
        for r in range(4):
            np.testing.assert_array_equal(got[step][r], want[step][r][:-1], err_msg=f"step {step} seq {r}")
    # the steps cross both shard boundaries, each dropping a tail (so the rule was exercised)
    assert int(want[-1][-1][1]) >= 200
    for k in (0, 1):
        last = max(int(x) for step in want for seq in step for x in seq if 100 * k <= x < 100 * k + 60)
        assert last < 100 * k + 59, f"shard {k}: its last document should be dropped"
    ld = TrainLoader(files, bos_id=BOS, max_seq_len=128, rank=0, world_size=1, seed=0, order="shuffled", group=4)
    try:
        assert not np.array_equal(ld.next_batch(T).inputs, want[0][0][:-1])
    finally:
        ld.close()


def test_loader_crosses_shards_and_epochs(tmp_path, capfd):
    _docs_shard(tmp_path / "fineweb_train_000001.bin", n_docs=20, seed=1)
    _docs_shard(tmp_path / "fineweb_train_000002.bin", n_docs=20, seed=2)
    files = list_shards(tmp_path, "fineweb_train_*.bin")
    ld = TrainLoader(files, bos_id=BOS, max_seq_len=1000, rank=0, world_size=1, seed=0)
    try:
        total = sum(int(np.minimum(np.diff(np.r_[np.flatnonzero(load_shard(f) == BOS), load_shard(f).size]),
                                   1000).sum()) for f in files)
        for _ in range(3 * total // 500 + 2):  # more than all the data: wraps into epoch 1
            b = ld.next_batch(499)
            assert b.inputs.shape == (499,) and b.inputs[0] == BOS
    finally:
        ld.close()
    assert "epoch 1" in capfd.readouterr().err


def test_val_batches_rank_slices(tmp_path):
    toks = np.arange(5000) % 500
    toks[::37] = BOS
    write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    files = list_shards(tmp_path, "fineweb_val_*.bin")
    r0 = val_batches(files, val_tokens=4096, tokens_per_forward=512, rank=0, world_size=2, bos_id=BOS)
    r1 = val_batches(files, val_tokens=4096, tokens_per_forward=512, rank=1, world_size=2, bos_id=BOS)
    assert len(r0) == len(r1) == 4
    chunks = [None] * 8
    for i, b in enumerate(r0):
        chunks[2 * i] = b
    for i, b in enumerate(r1):
        chunks[2 * i + 1] = b
    np.testing.assert_array_equal(np.concatenate([c.inputs for c in chunks]), toks[:4096])
    np.testing.assert_array_equal(np.concatenate([c.targets for c in chunks]), toks[1:4097])
    assert r0[0].inputs[0] == BOS and r1[0].inputs[0] != BOS  # not BOS aligned
    np.testing.assert_array_equal(r1[0].docs, np.cumsum(r1[0].inputs == BOS))
    with pytest.raises(DataError, match="eval.val_tokens=5000 needs 5001"):
        val_batches(files, val_tokens=5000, tokens_per_forward=500, rank=0, world_size=1, bos_id=BOS)


# -- synthetic data --------------------------------------------------------------------------
KW = dict(vocab=512, bos_id=BOS, mean_doc_len=100, zipf_a=1.1)


def test_synth_deterministic_prefix_stable_and_seeded():
    a = np.concatenate(list(synth_stream(50_000, seed=3, stream=1, **KW)))
    b = np.concatenate(list(synth_stream(50_000, seed=3, stream=1, **KW)))
    c = np.concatenate(list(synth_stream(20_000, seed=3, stream=1, **KW)))
    d = np.concatenate(list(synth_stream(50_000, seed=4, stream=1, **KW)))
    e = np.concatenate(list(synth_stream(50_000, seed=3, stream=2, **KW)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:20_000], c)
    assert (a != d).mean() > 0.5 and (a != e).mean() > 0.5
    assert a.dtype == np.uint16 and a.size == 50_000 and a.max() < 512


def test_synth_documents_and_structure():
    t = np.concatenate(list(synth_stream(400_000, seed=0, stream=1, **KW))).astype(np.int64)
    starts = np.flatnonzero(t == BOS)
    assert starts[0] == 0
    lens = np.diff(np.r_[starts, t.size])
    assert 70 < lens.mean() < 130  # mean_doc_len 100, lognormal
    assert np.median(lens) < lens.mean()  # heavy right tail, like web documents
    content = t[t != BOS]
    p = np.bincount(content, minlength=512) / content.size
    h1 = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert np.sort(p)[::-1][0] > 10 * np.median(p)  # Zipf-like skew
    pair = t[:-1] * 512 + t[1:]
    u, cnt = np.unique(pair, return_counts=True)
    prev = np.bincount(u // 512, weights=cnt, minlength=512)
    h2 = -(cnt * np.log(cnt / prev[u // 512])).sum() / cnt.sum()
    assert h2 < h1 - 1.0  # bigram structure: the previous token is informative


def test_write_synthetic_layout(tmp_path):
    m = write_synthetic(tmp_path, train_tokens=25_000, val_tokens=1000, shard_tokens=10_000, seed=1, **KW)
    train = list_shards(tmp_path, "fineweb_train_*.bin")
    assert [f.name for f in train] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin",
                                       "fineweb_train_000003.bin"]
    assert [read_header(f) for f in train] == [10_000, 10_000, 5_000]
    assert read_header(tmp_path / "fineweb_val_000000.bin") == 1001  # val_tokens targets + 1
    assert json.loads((tmp_path / "synth.json").read_text()) == m
    head = np.fromfile(train[0], dtype=np.int32, count=3)
    assert head.tolist() == [MAGIC, 1, 10_000]


SYN = dict(train_tokens=30_000, val_tokens=2000, vocab=512, bos_id=BOS, seed=5, mean_doc_len=100,
           zipf_a=1.1, shard_tokens=20_000)


def _ensure(d, q):
    try:
        tr, va = ensure_data(d, train_pattern="fineweb_train_*.bin", val_pattern="fineweb_val_*.bin",
                             synthetic=True, synth=SYN)
        q.put((len(tr), len(va)))
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put(repr(e))


def test_ensure_data_concurrent_generation(tmp_path):
    d = tmp_path / "data"
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch / loader threads
    q = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(d, q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [q.get(timeout=5) for _ in procs]
    assert results == [(2, 1)] * 3
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin", "synth.json"]
    assert not [p for p in d.iterdir() if p.name.startswith(".synth-")]  # temp dirs cleaned
    for f in list_shards(d, "*.bin"):
        read_header(f)


def test_ensure_data_errors(tmp_path):
    with pytest.raises(DataError, match="data.synthetic=true"):
        ensure_data(tmp_path, train_pattern="fineweb_train_*.bin", val_pattern="fineweb_val_*.bin",
                    synthetic=False, synth=SYN)
    ensure_data(tmp_path, train_pattern="fineweb_train_*.bin", val_pattern="fineweb_val_*.bin",
                synthetic=True, synth=SYN)
    with pytest.raises(DataError, match="seed: 5 on disk vs 6 configured"):
        ensure_data(tmp_path, train_pattern="fineweb_train_*.bin", val_pattern="fineweb_val_*.bin",
                    synthetic=True, synth={**SYN, "seed": 6})


def test_cli_synth(tmp_path, capsys):
    from trainer.data import main

    assert main(["synth", "--out", str(tmp_path), "--train-tokens", "5000", "--val-tokens", "100",
                 "--vocab", "300", "--shard-tokens", "4000"]) == 0
    assert [read_header(f) for f in list_shards(tmp_path, "fineweb_train_*.bin")] == [4000, 1000]
    assert load_shard(tmp_path / "fineweb_val_000000.bin")[0] == 299  # BOS defaults to vocab - 1
    assert main(["synth", "--out", str(tmp_path / "x"), "--train-tokens", "10", "--val-tokens", "10",
                 "--vocab", "70000"]) == 2
    assert "uint16" in capsys.readouterr().err

"""Shared fixtures of the trainer tests: one small synthetic data set per session."""
import pytest

from trainer.data import write_synthetic

TINY_SYNTH = dict(train_tokens=400_000, val_tokens=16_384, vocab=512, bos_id=511, seed=7, mean_doc_len=120,
                  zipf_a=1.1, shard_tokens=200_000)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A directory of tiny synthetic shards (2 train shards of 200k tokens, 16k val targets)."""
    d = tmp_path_factory.mktemp("synth-tiny")
    write_synthetic(d, **TINY_SYNTH)
    return d


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process training on one thread: two OpenMP threads on a busy 2-core machine stall at
    every barrier (10-50× slower); restore the setting for the rest of the session."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

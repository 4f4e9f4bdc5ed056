"""nanoforge.data: next-token windows from a corpus, for Lightning.

Windows are contiguous pieces of the text with y = x shifted by one; the split is a contiguous
90/10; tokens come from the corpus's token file (test_shards.py); the training stream is
seeded per rank and resumable at any batch; validation batches are the same every time; bad
settings are UserErrors.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoforge.data import RandomWindows, TextDataModule
from nanoforge.errors import UserError


def test_windows_are_contiguous_text_and_y_is_x_shifted(text_file, tmp_path):
    dm = TextDataModule(
        corpus="text",
        path=str(text_file),
        block_size=16,
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    text = text_file.read_text()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row_x, row_y in zip(x, y, strict=True):
        window = dm.tokenizer.decode(row_x) + dm.tokenizer.decode(row_y[-1:])
        assert window in text  # a real, contiguous piece of the corpus


def test_split_is_contiguous_90_10(text_file, tmp_path):
    dm = TextDataModule(corpus="text", path=str(text_file), block_size=8, cache_dir=None)
    dm.setup()
    ids = dm.tokenizer.encode(text_file.read_text())
    n_train = int(len(ids) * 0.9)
    assert np.array_equal(dm.train_ids, ids[:n_train])
    assert np.array_equal(dm.val_ids, ids[n_train:])
    assert dm.train_ids.dtype == np.uint8  # a char vocabulary of < 256 fits a byte


def test_tokens_are_read_from_the_token_file_by_memory_map(text_file, tmp_path):
    cache = tmp_path / "cache"
    dm = TextDataModule(corpus="text", path=str(text_file), block_size=8, cache_dir=str(cache))
    dm.prepare_data()
    files = sorted(p.suffix for p in cache.glob("tokens-char-*"))
    assert files == [".bin", ".json", ".lock"]
    dm.setup()
    assert isinstance(dm.train_ids, np.memmap) and isinstance(dm.val_ids, np.memmap)
    in_memory = TextDataModule(corpus="text", path=str(text_file), block_size=8, cache_dir=None)
    in_memory.setup()
    assert np.array_equal(dm.train_ids, in_memory.train_ids)
    assert np.array_equal(dm.val_ids, in_memory.val_ids)
    assert dm.tokenizer == in_memory.tokenizer


def test_stream_is_seeded_per_rank_and_resumable():
    data = torch.arange(1000)
    a = RandomWindows(data, 8, 4, seed=1, split="train")
    b = RandomWindows(data, 8, 4, seed=1, split="train")
    other_rank = RandomWindows(data, 8, 4, seed=1, split="train", rank=1)
    first = [x for x, _ in zip(a, range(6), strict=False)]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, b, strict=False))
    assert not torch.equal(first[0][0], next(iter(other_rank))[0])
    resumed = RandomWindows(data, 8, 4, seed=1, split="train", start_batch=3)
    assert torch.equal(next(iter(resumed))[0], first[3][0])


def test_validation_batches_are_fixed_and_finite(text_file):
    dm = TextDataModule(
        corpus="text", path=str(text_file), block_size=8, val_batches=3, cache_dir=None
    )
    dm.setup()
    first = [x for x, _ in dm.val_dataloader()]
    second = [x for x, _ in dm.val_dataloader()]
    assert len(first) == 3
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))


def test_corpus_too_short_for_a_window(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("abcdefghij" * 3)
    dm = TextDataModule(corpus="text", path=str(p), block_size=8, cache_dir=None)
    with pytest.raises(UserError, match="block_size"):
        dm.setup()


@pytest.mark.parametrize("kw", [{"block_size": 0}, {"batch_size": 0}, {"val_fraction": 1.0}])
def test_bad_data_settings(kw):
    with pytest.raises(UserError):
        TextDataModule(**kw)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=400),
    block=st.integers(min_value=1, max_value=64),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_any_window_is_contiguous(n, block, seed):
    data = torch.arange(n)
    if n < block + 1:
        with pytest.raises(UserError):
            RandomWindows(data, block, 3, seed=seed, split="train")
        return
    x, y = RandomWindows(data, block, 3, seed=seed, split="train").batch(0)
    assert torch.equal(y, x + 1)  # over arange, contiguity == consecutive integers
    assert int(y.max()) < n

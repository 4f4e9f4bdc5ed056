"""nanoforge.shards: a corpus encoded once into a token file, read back by memory map.

The file holds the narrowest dtype, its header says what it is; it is reused while the source
is unchanged, prepared again when the source changes, rebuilt when truncated or its header is
damaged; chunk-wise (streamed) encoding gives the tokens of whole-text encoding; windows from
the memory map equal windows from the same tokens in memory, and differ per DDP rank.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from nanoforge import documents, shards
from nanoforge.corpora import open_corpus
from nanoforge.data import RandomWindows
from nanoforge.errors import UserError
from nanoforge.tokenizer import BPETokenizer, CharTokenizer
from tests.helpers import make_text


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(make_text(40_000, seed=2) + "naïve café 東京\n", encoding="utf-8")
    return p


def files(cache):
    return sorted(cache.glob("tokens-*.bin"))


def test_narrowest_dtype():
    assert shards.narrowest_dtype(256) == np.uint8
    assert shards.narrowest_dtype(257) == np.uint16
    assert shards.narrowest_dtype(50_257) == np.uint16
    assert shards.narrowest_dtype(65_537) == np.uint32


def test_token_file_and_header(corpus, tmp_path):
    cache = tmp_path / "cache"
    shard = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    text = corpus.read_text(encoding="utf-8")
    header = json.loads(shard.path.with_suffix(".json").read_text())
    assert header["source_sha256"] == open_corpus("text", corpus).sha256()
    assert header["n_chars"] == len(text) and header["n_bytes"] == len(text.encode())
    assert header["n_train"] == int(len(text) * 0.9) == len(shard.train)
    assert header["dtype"] == "uint8" and header["tokenizer"]["kind"] == "char"
    assert shard.path.stat().st_size == len(text)  # one byte per character token
    tok = CharTokenizer.from_text(text)
    assert shard.tokenizer == tok
    assert np.array_equal(np.concatenate([shard.train, shard.val]), tok.encode(text))


def test_reused_while_unchanged_and_reprepared_when_the_source_changes(corpus, tmp_path):
    cache = tmp_path / "cache"
    first = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    mtime = first.path.stat().st_mtime_ns
    again = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    corpus.write_text(corpus.read_text(encoding="utf-8") + "more text\n", encoding="utf-8")
    changed = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    assert changed.path != first.path and len(files(cache)) == 2
    assert changed.header["n_chars"] == first.header["n_chars"] + len("more text\n")
    # another split or tokenizer is another file
    shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.2, cache)
    assert len(files(cache)) == 3


def test_truncated_file_or_damaged_header_is_rebuilt(corpus, tmp_path):
    cache = tmp_path / "cache"
    good = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    want = np.array(np.concatenate([good.train, good.val]))
    with open(good.path, "r+b") as f:  # a crash or full disk cut it short
        f.truncate(good.path.stat().st_size // 2)
    assert shards.read_shard(good.path, good.header["source_sha256"]) is None
    rebuilt = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    assert np.array_equal(np.concatenate([rebuilt.train, rebuilt.val]), want)
    good.path.with_suffix(".json").write_text("{not json")
    rebuilt = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    assert np.array_equal(np.concatenate([rebuilt.train, rebuilt.val]), want)


def test_streamed_bpe_encoding_equals_whole_text_encoding(corpus, tmp_path, monkeypatch):
    """Tiny chunks force hundreds of cuts: the tokens are those of the whole text, split at
    the character split point, and <|endoftext|> ends the document; the merges come from the
    training split only."""
    monkeypatch.setattr(shards, "BPE_CHUNK_CHARS", 100)
    text = corpus.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    shard = shards.load_or_prepare(open_corpus("text", corpus), "bpe", 300, 0.1, tmp_path / "c")
    tok = shard.tokenizer
    assert isinstance(tok, BPETokenizer) and shard.train.dtype == np.uint16
    assert tok == BPETokenizer.train([text[:n]], 300) and tok.eot_id == 299
    assert np.array_equal(shard.train, tok.encode(text[:n]))
    assert np.array_equal(shard.val, [*tok.encode(text[n:]), tok.eot_id])
    pieces = list(shards.iter_chunks([text[i : i + 777] for i in range(0, len(text), 777)], 100))
    assert "".join(pieces) == text and len(pieces) > 100


def test_memmap_windows_equal_in_memory_windows(corpus, tmp_path):
    shard = shards.load_or_prepare(
        open_corpus("text", corpus), "char", None, 0.1, tmp_path / "cache"
    )
    assert isinstance(shard.train, np.memmap)
    in_memory = torch.from_numpy(np.array(shard.train, dtype=np.int64))
    for rank in (0, 1):
        a = RandomWindows(shard.train, 32, 8, seed=3, split="train", rank=rank)
        b = RandomWindows(in_memory, 32, 8, seed=3, split="train", rank=rank)
        for i in range(5):
            (xa, ya), (xb, yb) = a.batch(i), b.batch(i)
            assert xa.dtype == torch.int64
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_ranks_read_distinct_windows_and_workers_get_the_file_not_its_contents(corpus, tmp_path):
    shard = shards.load_or_prepare(
        open_corpus("text", corpus), "char", None, 0.1, tmp_path / "cache"
    )
    r0 = RandomWindows(shard.train, 32, 8, seed=3, split="train", rank=0)
    r1 = RandomWindows(shard.train, 32, 8, seed=3, split="train", rank=1)
    for i in range(3):
        assert not torch.equal(r0.batch(i)[0], r1.batch(i)[0])
    blob = pickle.dumps(r0)  # what a DataLoader worker receives
    assert len(blob) < 2000  # the file's name, not its tokens
    copy = pickle.loads(blob)
    assert isinstance(copy.data, np.memmap) and torch.equal(copy.batch(2)[0], r0.batch(2)[0])


def test_a_given_tokenizer_that_cannot_encode_the_text(corpus, tmp_path):
    with pytest.raises(UserError, match="never saw"):
        shards.load_or_prepare(
            open_corpus("text", corpus), tokenizer=CharTokenizer("abc"), cache_dir=tmp_path / "c"
        )
    assert not files(tmp_path / "c")  # nothing half-written is left


def test_blank_corpus(tmp_path):
    p = tmp_path / "blank.txt"
    p.write_text("\n\n   \n")
    with pytest.raises(UserError, match="holds no text"):
        shards.load_or_prepare(open_corpus("text", p), "char", None, 0.1, None)


def test_a_checkpoints_tokenizer_reuses_the_file_its_run_made(corpus, tmp_path):
    """eval.py and init_from encode with the checkpoint's tokenizer: the training run's file
    is reused when it holds that tokenizer, not encoded again."""
    cache = tmp_path / "cache"
    made = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    again = shards.load_or_prepare(
        open_corpus("text", corpus), tokenizer=made.tokenizer, cache_dir=cache
    )
    assert again.path == made.path and len(files(cache)) == 1
    other = CharTokenizer(sorted(set(corpus.read_text(encoding="utf-8")) | {"~"}))
    shards.load_or_prepare(open_corpus("text", corpus), tokenizer=other, cache_dir=cache)
    assert len(files(cache)) == 2  # another vocabulary: another file


def test_a_token_edited_in_place_or_an_edited_header_is_noticed_and_rebuilt(corpus, tmp_path):
    """The header holds the sha256 of the .bin and of itself: a valid id changed in place, or
    a header edited to other valid numbers, is not used but prepared again."""
    cache = tmp_path / "cache"
    good = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    want = np.array(np.concatenate([good.train, good.val]))
    data = bytearray(good.path.read_bytes())
    data[100] = (data[100] + 1) % good.tokenizer.vocab_size  # still a valid id
    good.path.write_bytes(bytes(data))
    rebuilt = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    assert np.array_equal(np.concatenate([rebuilt.train, rebuilt.val]), want)
    header_file = good.path.with_suffix(".json")
    header = json.loads(header_file.read_text())
    header["n_train"] -= 1000  # a different split, same file size
    header_file.write_text(json.dumps(header))
    rebuilt = shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    assert rebuilt.header["n_train"] == header["n_train"] + 1000 == len(rebuilt.train)


def test_a_cache_dir_that_cannot_be_made_is_one_line(corpus, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=r"data.cache_dir .*a_file/cache.*cannot be written"):
        shards.load_or_prepare(
            open_corpus("text", corpus), "char", None, 0.1, tmp_path / "a_file/cache"
        )


def test_a_read_only_cache_dir_is_one_line(corpus, tmp_path, monkeypatch):
    import errno

    def read_only(path, write):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(shards, "atomic_write", read_only)
    with pytest.raises(UserError, match="cannot be written .*Read-only file system"):
        shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, tmp_path / "c")


def test_a_file_size_limit_during_preparation_is_one_line_and_leaves_nothing(tmp_path):
    """``ulimit -f`` (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import resource

    big = tmp_path / "big.txt"
    big.write_text(make_text(600_000, seed=4), encoding="utf-8")
    cache = tmp_path / "cache"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, hard))
    try:
        with pytest.raises(UserError, match=r"file size limit \(ulimit -f\)"):
            shards.load_or_prepare(open_corpus("text", big), "char", None, 0.1, cache)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p.suffix for p in cache.iterdir()] == [".lock"]


@pytest.mark.parametrize("fault", ["ctrl-c", "full disk"])
def test_ctrl_c_or_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(
    corpus, tmp_path, monkeypatch, fault
):
    import errno

    real = shards.encode_stream

    def interrupted(*args):
        for i, item in enumerate(real(*args)):
            if i == 3:
                if fault == "ctrl-c":
                    raise KeyboardInterrupt
                raise OSError(errno.ENOSPC, "No space left on device")
            yield item

    monkeypatch.setattr(documents, "BLOCK", 1000)  # many pieces
    monkeypatch.setattr(shards, "CHAR_BATCH_CHARS", 1000)  # encoded a few at a time
    monkeypatch.setattr(shards, "encode_stream", interrupted)
    cache = tmp_path / "cache"
    match = "interrupted .*nothing was kept" if fault == "ctrl-c" else "the disk is full"
    with pytest.raises(UserError, match=match):
        shards.load_or_prepare(open_corpus("text", corpus), "char", None, 0.1, cache)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]


def test_a_bpe_without_end_of_text_keeps_documents_apart_with_blank_lines(tmp_path):
    """A BPE checkpoint from before <|endoftext|> (a vocabulary without it) encodes documents
    as it always did: joined by a blank line, the split counted over that same text."""
    from tokenizers import Tokenizer

    folder = tmp_path / "docs"
    folder.mkdir()
    docs = [make_text(3000, seed=i) for i in range(3)]
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d, encoding="utf-8")
    new = BPETokenizer.train(docs, 300)
    hf = json.loads(new.to_hf_json())
    hf["added_tokens"] = []  # as BPE vocabularies were before
    old = BPETokenizer(Tokenizer.from_str(json.dumps(hf)))
    assert old.eot_id is None
    shard = shards.load_or_prepare(open_corpus("text", folder), tokenizer=old)
    text = "\n\n".join(docs)
    n = int(len(text) * 0.9)
    assert shard.header["n_chars"] == len(text)
    assert np.array_equal(shard.train, old.encode(text[:n]))
    assert np.array_equal(shard.val, old.encode(text[n:]))

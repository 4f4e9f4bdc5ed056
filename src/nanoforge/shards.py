"""A corpus encoded once into a flat token file on disk, read back through ``np.memmap``.

``<cache_dir>/tokens-<kind>-<key>.bin`` holds every token of the corpus, training split
first, in the narrowest dtype the vocabulary fits (uint8 / uint16 / uint32);
``tokens-<kind>-<key>.json`` beside it says what the file is: the tokenizer (its plain
``state_dict``), the token counts, the split point, and the sha256 of the source. The key is
a hash of the source's bytes, the tokenizer asked for and the split, so a changed corpus is
prepared again. A header that does not parse or a ``.bin`` whose size disagrees with it is
rebuilt, never trusted; both files are written atomically (header last), under a file lock,
so concurrent processes (DDP ranks, sweep jobs) prepare once.

Preparation streams: files are read in blocks and re-cut into chunks of about 8 MB at points
where GPT-2's pre-tokenizer cuts too (a newline between two non-space characters), so
encoding chunk by chunk gives the same tokens as encoding the whole text; chunks are encoded
on every core. Passes: (1) count characters (and collect them, for ``char``), which fixes the
split point; (2) for ``bpe``, learn the merges from the training split only; (3) encode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanoforge.corpora import Part, iter_bytes, iter_text
from nanoforge.errors import UserError
from nanoforge.io import atomic_write, atomic_write_bytes
from nanoforge.machine import cpu_cores
from nanoforge.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_state

log = logging.getLogger(__name__)

FORMAT = 1
CHUNK_CHARS = 8 << 20
BPE_CHUNK_CHARS, BPE_BATCH = 1 << 16, 64  # BPE encodes 64 pieces of 64k characters at once
# after "<non-space>\n", before "<non-space>": GPT-2's pre-tokenizer splits here too
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def narrowest_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit in 32 bits")


def source_sha256(parts: list[Part]) -> str:
    """The identity of a corpus: the sha256 of its UTF-8 bytes (read in blocks)."""
    h = hashlib.sha256()
    for block in iter_bytes(parts):
        h.update(block)
    return h.hexdigest()


def source_bytes(parts: list[Part]) -> int:
    return sum(len(p.encode()) if isinstance(p, str) else p.stat().st_size for p in parts)


def iter_chunks(pieces: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """The text of ``pieces`` re-cut into chunks of about ``size`` characters, each cut where
    the BPE pre-tokenizer would cut anyway (so chunk-wise encoding = whole-text encoding)."""
    held: list[str] = []
    n = 0
    for piece in pieces:
        held.append(piece)
        n += len(piece)
        if n < size:
            continue
        text = "".join(held)
        start = 0
        while len(text) - start >= size:
            m = _SAFE_CUT.search(text, start + size - 1)
            if m is None:
                break
            yield text[start : m.end()]
            start = m.end()
        held, n = [text[start:]], len(text) - start
    if n:
        yield "".join(held)


def _split_at(chunks: Iterable[str], n_train_chars: int) -> Iterator[tuple[str, str]]:
    """(split, text) pieces: the chunks, with the one holding the split point cut there."""
    pos = 0
    for chunk in chunks:
        end = pos + len(chunk)
        if end <= n_train_chars:
            yield "train", chunk
        elif pos >= n_train_chars:
            yield "val", chunk
        else:
            k = n_train_chars - pos
            yield "train", chunk[:k]
            yield "val", chunk[k:]
        pos = end


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(fn, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, in order, with a bounded queue."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _bar(total: int, desc: str):
    from tqdm import tqdm

    # MB/s as it goes (on a terminal; a log gets the one summary line below)
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1 << 20,
        disable=None,
        leave=False,
    )


@dataclass
class Scan:
    n_chars: int
    n_bytes: int
    chars: list[str]


def scan(parts: list[Part], want_chars: bool) -> Scan:
    """Pass 1: characters and bytes, and (``want_chars``) the sorted set of characters."""
    seen_ascii = np.zeros(128, dtype=bool)
    seen = set()
    n_chars = n_bytes = 0
    nonspace = False
    bar = _bar(source_bytes(parts), "scan")
    for piece in iter_text(parts):
        n_chars += len(piece)
        if piece.isascii():
            b = piece.encode("ascii")
            n_bytes += len(b)
            if want_chars:
                seen_ascii |= np.bincount(np.frombuffer(b, np.uint8), minlength=128) > 0
        else:
            cps = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
            n_bytes += len(piece.encode("utf-8"))
            if want_chars:
                seen.update(np.unique(cps).tolist())
        nonspace = nonspace or not piece.isspace()
        bar.update(len(piece))
    bar.close()
    if not nonspace:
        raise UserError("the corpus holds no text (it is empty or blank). Use a non-empty corpus.")
    codepoints = sorted(set(np.flatnonzero(seen_ascii).tolist()) | seen)
    return Scan(n_chars, n_bytes, [chr(c) for c in codepoints])


@dataclass
class Shard:
    """A prepared corpus: the tokenizer, the training and validation tokens (memory-mapped
    from the ``.bin``, or in memory when there is no cache folder), and the header."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    header: dict
    path: Path | None = None


def _spec(kind: str, vocab_size: int | None, tokenizer: Tokenizer | None) -> dict:
    if tokenizer is not None:  # a given tokenizer (a checkpoint's): keyed by its contents
        state = json.dumps(tokenizer.state_dict(), sort_keys=True)
        return {"tokenizer": hashlib.sha256(state.encode()).hexdigest()}
    return {"tokenizer": kind, "vocab_size": vocab_size if kind == "bpe" else None}


def shard_paths(cache_dir, kind: str, sha256: str, spec: dict, val_fraction: float):
    key = json.dumps(
        {"format": FORMAT, "source": sha256, **spec, "split": val_fraction}, sort_keys=True
    )
    name = f"tokens-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    folder = Path(cache_dir)
    return folder / f"{name}.bin", folder / f"{name}.json"


def read_shard(bin_path: Path, header_path: Path, sha256: str) -> Shard | None:
    """The shard if its header parses, matches the source and its ``.bin`` has exactly the
    size the header says; None otherwise (the caller rebuilds it)."""
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
        dtype = np.dtype(header["dtype"])
        n_tokens, n_train = int(header["n_tokens"]), int(header["n_train"])
        if header["format"] != FORMAT or header["source_sha256"] != sha256:
            return None
        if not bin_path.is_file() or bin_path.stat().st_size != n_tokens * dtype.itemsize:
            return None
        tokenizer = tokenizer_from_state(header["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None
    train = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_train,))
    val = np.memmap(
        bin_path,
        dtype=dtype,
        mode="r",
        offset=n_train * dtype.itemsize,
        shape=(n_tokens - n_train,),
    )
    return Shard(tokenizer, train, val, header, bin_path)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path`` (one process prepares; the others wait, then read)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_or_prepare(
    parts: list[Part],
    kind: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
    source: str = "",
    chunk_chars: int = CHUNK_CHARS,
) -> Shard:
    """The corpus's shard: read from ``cache_dir`` if a sound one is there, else prepared (and
    written there; with no ``cache_dir``, held in memory)."""
    kind = tokenizer.kind if tokenizer is not None else kind
    sha256 = source_sha256(parts)
    if cache_dir is None:
        return prepare(
            parts, sha256, kind, vocab_size, val_fraction, None, tokenizer, source, chunk_chars
        )
    if tokenizer is not None:  # the file a run with this tokenizer made from this corpus
        own = _spec(kind, tokenizer.vocab_size, None)
        shard = read_shard(*shard_paths(cache_dir, kind, sha256, own, val_fraction), sha256)
        if shard is not None and shard.tokenizer == tokenizer:
            return shard
    spec = _spec(kind, vocab_size, tokenizer)
    bin_path, header_path = shard_paths(cache_dir, kind, sha256, spec, val_fraction)
    shard = read_shard(bin_path, header_path, sha256)
    if shard is not None:
        return shard
    with _locked(bin_path.with_suffix(".lock")):
        shard = read_shard(bin_path, header_path, sha256)  # another process made it meanwhile
        if shard is None:
            header_path.unlink(missing_ok=True)  # damaged or stale: rebuilt, never trusted
            prepare(
                parts,
                sha256,
                kind,
                vocab_size,
                val_fraction,
                bin_path,
                tokenizer,
                source,
                chunk_chars,
            )
            shard = read_shard(bin_path, header_path, sha256)
    if shard is None:
        raise UserError(f"the token file {bin_path} could not be read back after writing it")
    return shard


def prepare(
    parts: list[Part],
    sha256: str,
    kind: str,
    vocab_size: int | None,
    val_fraction: float,
    bin_path: Path | None,
    tokenizer: Tokenizer | None = None,
    source: str = "",
    chunk_chars: int = CHUNK_CHARS,
) -> Shard | None:
    """Encode the corpus (the three passes of the module docstring) into ``bin_path`` + its
    JSON header, or into memory when ``bin_path`` is None."""
    t0 = time.perf_counter()
    info = scan(parts, want_chars=tokenizer is None and kind == "char")
    n_train_chars = int(info.n_chars * (1 - val_fraction))
    if tokenizer is None and kind == "char":
        tokenizer = CharTokenizer(info.chars)
    elif tokenizer is None:  # BPE merges from the training split only
        pieces = iter_chunks(iter_text(parts), min(chunk_chars, BPE_CHUNK_CHARS))
        train_text = (text for split, text in _split_at(pieces, n_train_chars) if split == "train")
        tokenizer = BPETokenizer.train(train_text, vocab_size)
    dtype = narrowest_dtype(tokenizer.vocab_size)
    counts = {"train": 0, "val": 0}
    if isinstance(tokenizer, BPETokenizer):
        # small pieces, many at a time: the Rust side spreads a batch over every core
        texts = iter_chunks(iter_text(parts), min(chunk_chars, BPE_CHUNK_CHARS))
        batches = _batched(_split_at(texts, n_train_chars), BPE_BATCH)
        workers = 1
    else:  # characters need no cut points; NumPy releases the GIL, so threads share the work
        batches = _batched(_split_at(iter_text(parts), n_train_chars), 1)
        workers = cpu_cores()

    def encode(batch: list[tuple[str, str]]) -> list[tuple[str, np.ndarray, int]]:
        if isinstance(tokenizer, BPETokenizer):
            ids = tokenizer.encode_batch([text for _, text in batch])
        else:
            ids = [tokenizer.encode(text) for _, text in batch]
        return [(split, i.astype(dtype), len(t)) for (split, t), i in zip(batch, ids, strict=True)]

    def pieces() -> Iterator[tuple[str, np.ndarray]]:
        bar = _bar(info.n_bytes, "encode")
        for batch in _ordered_map(encode, batches, workers):
            for split, ids, n in batch:
                counts[split] += len(ids)
                bar.update(n)
                yield split, ids
        bar.close()

    header = {
        "format": FORMAT,
        "source": source,
        "source_sha256": sha256,
        "tokenizer": tokenizer.state_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "n_chars": info.n_chars,
        "n_train_chars": n_train_chars,
        "n_bytes": info.n_bytes,
    }
    if bin_path is None:
        arrays = {"train": [], "val": []}
        for split, ids in pieces():
            arrays[split].append(ids)
        train, val = (np.concatenate([np.zeros(0, dtype), *arrays[s]]) for s in ("train", "val"))
        header.update({"n_tokens": len(train) + len(val), "n_train": len(train)})
        _log_done(header, t0)
        return Shard(tokenizer, train, val, header)

    def write(f) -> None:
        for _, ids in pieces():
            f.write(ids.tobytes())

    atomic_write(bin_path, write)
    header.update({"n_tokens": counts["train"] + counts["val"], "n_train": counts["train"]})
    atomic_write_bytes(
        bin_path.with_suffix(".json"), (json.dumps(header, indent=1) + "\n").encode()
    )
    _log_done(header, t0)
    return None  # the caller reads it back through read_shard


def _log_done(header: dict, t0: float) -> None:
    seconds = time.perf_counter() - t0
    log.info(
        f"prepared {header['n_bytes'] / 1e6:,.1f} MB into {header['n_tokens']:,} "
        f"{header['tokenizer']['kind']} tokens ({header['dtype']}) in {seconds:.1f} s, "
        f"{header['n_bytes'] / 1e6 / max(seconds, 1e-9):,.1f} MB/s"
    )

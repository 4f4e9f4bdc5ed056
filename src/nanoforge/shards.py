"""A corpus encoded once into a flat token file on disk, read back through ``np.memmap``.

``<cache_dir>/tokens-<kind>-<key>.bin`` holds every token of the corpus, training split
first, in the narrowest dtype the vocabulary fits (uint8 / uint16 / uint32);
``tokens-<kind>-<key>.json`` beside it says what the file is: the tokenizer (its plain
``state_dict``), the token counts, the split point, the sha256 of the source, and the sha256
of the ``.bin`` itself and of the header, written after the ``.bin``. The key is a hash of the
source's bytes, the tokenizer asked for and the split, so a changed corpus is prepared again.
A header that does not parse or fails its digest, a ``.bin`` whose size or digest disagrees
with it (a token edited in place) is rebuilt, never trusted; both files are written atomically
(header last), under a file lock, so concurrent processes (DDP ranks, sweep jobs) prepare once.

Documents: with a BPE vocabulary every document ends with ``<|endoftext|>`` (the tokenizer's
``eot_id``), as GPT-2's own training data did, so windows see where a text stops; it stands
for no bytes. Characters keep earlier versions' tokens: documents joined by a blank line.

Preparation streams: documents are read piece by piece and re-cut into chunks at points where
GPT-2's pre-tokenizer cuts too (a newline between two non-space characters), so encoding chunk
by chunk gives the same tokens as encoding a whole document; chunks are encoded on every core.
Passes: (1) count characters (and collect them, for ``char``), which fixes the split point;
(2) for ``bpe``, learn the merges from the training split only; (3) encode.
"""

from __future__ import annotations

import contextlib
import errno
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

from nanoforge.corpora import Corpus
from nanoforge.errors import UserError
from nanoforge.io import atomic_write, atomic_write_bytes
from nanoforge.machine import cpu_cores
from nanoforge.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_state

log = logging.getLogger(__name__)

FORMAT = 2  # 2: <|endoftext|> after each BPE document; digests of the .bin and the header
BPE_CHUNK_CHARS = 1 << 16  # BPE encodes pieces of at most 64k characters ...
BPE_BATCH_CHARS = 1 << 20  # ... about 1M characters of them at a time, on every core
CHAR_BATCH_CHARS = 8 << 20  # characters: many small documents become one NumPy pass
CHAR_SEPARATOR = "\n\n"  # between documents, for characters
# after "<non-space>\n", before "<non-space>": GPT-2's pre-tokenizer splits here too
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


class _End:
    """The end of a document in a stream of text pieces (one instance: :data:`END`)."""

    def __repr__(self) -> str:
        return "END"


END = _End()


def narrowest_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit in 32 bits")


# --------------------------------------------------------------------------- the text stream
def stream(corpus: Corpus, eot: bool) -> Iterator[str | _End]:
    """The corpus's text as pieces; ``eot``: :data:`END` after each document, else a blank
    line between documents (characters)."""
    started = has_text = False
    for text, end in corpus.pieces():
        if not eot and started and text:
            yield CHAR_SEPARATOR
            started = False
        if text:
            has_text = True
            yield text
        if end and has_text:  # an empty document adds nothing
            if eot:
                yield END
            else:
                started = True
            has_text = False


def iter_chunks(pieces: Iterable[str | _End], size: int = BPE_CHUNK_CHARS) -> Iterator[str | _End]:
    """The text of ``pieces`` re-cut into chunks of about ``size`` characters, each cut where
    the BPE pre-tokenizer would cut anyway (so chunk-wise encoding = whole-text encoding); a
    document's end flushes its text and passes on."""
    held: list[str] = []
    n = 0
    for piece in pieces:
        if piece is END:
            if n:
                yield "".join(held)
            held, n = [], 0
            yield END
            continue
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


def split_at(chunks: Iterable[str | _End], n_train_chars: int) -> Iterator[tuple[str, str | _End]]:
    """(split, piece): the chunks, with the one holding the split point cut there; a
    document's end goes with the text before it."""
    pos = 0
    for chunk in chunks:
        if chunk is END:
            yield ("train" if pos <= n_train_chars else "val"), END
            continue
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


def _batched(items: Iterable[tuple[str, str | _End]], chars: int) -> Iterator[list]:
    batch, n = [], 0
    for item in items:
        batch.append(item)
        n += 0 if item[1] is END else len(item[1])
        if n >= chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _joined(batches: Iterable[list]) -> Iterator[list]:
    """Each batch with neighbouring texts of one split joined (characters encode alike either
    way, and one long text is one vectorised pass instead of one per document)."""
    for batch in batches:
        joined: list[tuple[str, list[str]]] = []
        for split, text in batch:
            if joined and joined[-1][0] == split:
                joined[-1][1].append(text)
            else:
                joined.append((split, [text]))
        yield [(split, "".join(texts)) for split, texts in joined]


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


# --------------------------------------------------------------------------- pass 1: scan
@dataclass
class Scan:
    n_chars: int
    n_bytes: int
    chars: list[str]


def scan(corpus: Corpus, want_chars: bool, eot: bool) -> Scan:
    """Pass 1: characters and bytes, and (``want_chars``) the sorted set of characters."""
    seen_ascii = np.zeros(128, dtype=bool)
    seen = set()
    n_chars = n_bytes = 0
    nonspace = False
    bar = _bar(corpus.n_bytes(), "scan")
    for piece in stream(corpus, eot):
        if piece is END:
            continue
        n_chars += len(piece)
        if piece.isascii():
            n_bytes += len(piece)
            if want_chars:
                b = np.frombuffer(piece.encode("ascii"), np.uint8)
                seen_ascii |= np.bincount(b, minlength=128) > 0
        else:
            n_bytes += len(piece.encode("utf-8"))
            if want_chars:
                seen.update(np.unique(np.frombuffer(piece.encode("utf-32-le"), np.uint32)).tolist())
        nonspace = nonspace or not piece.isspace()
        bar.update(len(piece))
    bar.close()
    if not nonspace:
        raise UserError(
            f"{corpus.name} holds no text (it is empty or blank). Use a non-empty corpus."
        )
    codepoints = sorted(set(np.flatnonzero(seen_ascii).tolist()) | seen)
    return Scan(n_chars, n_bytes, [chr(c) for c in codepoints])


# --------------------------------------------------------------------------- passes 2 and 3
@dataclass
class Shard:
    """A prepared corpus: the tokenizer, the training and validation tokens (memory-mapped
    from the ``.bin``, or in memory when there is no cache folder), and the header."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    header: dict
    path: Path | None = None


def build_tokenizer(corpus: Corpus, kind: str, vocab_size, info: Scan, n_train: int):
    """Pass 2: the tokenizer a corpus asks for (BPE merges from the training split only)."""
    if kind == "char":
        tokenizer = CharTokenizer(info.chars)
        tokenizer.warn_if_large()
        return tokenizer
    pieces = iter_chunks(stream(corpus, eot=True), BPE_CHUNK_CHARS)
    train_text = (t for split, t in split_at(pieces, n_train) if split == "train" and t is not END)
    return BPETokenizer.train(train_text, vocab_size)


def encode_stream(corpus: Corpus, tokenizer: Tokenizer, n_train: int, n_bytes: int):
    """Pass 3: ``(split, ids)`` in corpus order, ``<|endoftext|>`` after each BPE document."""
    dtype = narrowest_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    cores = cpu_cores()
    if isinstance(tokenizer, BPETokenizer):
        pieces = iter_chunks(stream(corpus, eot=eot is not None), BPE_CHUNK_CHARS)
        batches, workers = _batched(split_at(pieces, n_train), BPE_BATCH_CHARS), 2
    else:  # characters need no cut points; NumPy releases the GIL, so threads share the work
        batches = _joined(_batched(split_at(stream(corpus, eot=False), n_train), CHAR_BATCH_CHARS))
        workers = cores
    end_ids = np.array([eot if eot is not None else 0], dtype=dtype)

    def encode(batch: list) -> list[tuple[str, np.ndarray, int]]:
        texts = [t for _, t in batch if t is not END]
        if isinstance(tokenizer, BPETokenizer):
            encoded = iter(tokenizer.encode_batch(texts, cores))
        else:
            encoded = iter([tokenizer.encode(t) for t in texts])
        return [
            (split, end_ids, 0) if t is END else (split, next(encoded).astype(dtype), len(t))
            for split, t in batch
        ]

    bar = _bar(n_bytes, "encode")
    for batch in _ordered_map(encode, batches, workers):
        for split, ids, n in batch:
            bar.update(n)
            yield split, ids
    bar.close()


def _header(corpus: Corpus, sha256: str, tokenizer: Tokenizer, info: Scan, val_fraction) -> dict:
    return {
        "format": FORMAT,
        "source": corpus.name,
        "source_sha256": sha256,
        "tokenizer": tokenizer.state_dict(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": narrowest_dtype(tokenizer.vocab_size).name,
        "val_fraction": val_fraction,
        "n_chars": info.n_chars,
        "n_train_chars": int(info.n_chars * (1 - val_fraction)),
        "n_bytes": info.n_bytes,
    }


def _start(corpus, sha256, kind, vocab_size, val_fraction, tokenizer):
    """Passes 1 and 2: the header so far, and the tokenizer."""
    kind = tokenizer.kind if tokenizer is not None else kind
    # documents end with <|endoftext|> where the vocabulary has it (a BPE learned here, GPT-2's),
    # else a blank line separates them (characters, a BPE checkpoint from before): counted so
    eot = tokenizer.eot_id is not None if tokenizer is not None else kind == "bpe"
    info = scan(corpus, want_chars=tokenizer is None and kind == "char", eot=eot)
    n_train = int(info.n_chars * (1 - val_fraction))
    if tokenizer is None:
        tokenizer = build_tokenizer(corpus, kind, vocab_size, info, n_train)
    return _header(corpus, sha256, tokenizer, info, val_fraction), tokenizer


def prepare_in_memory(
    corpus: Corpus,
    kind: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    tokenizer: Tokenizer | None = None,
) -> Shard:
    """The corpus's tokens held in memory (``data.cache_dir=null``)."""
    t0 = time.perf_counter()
    header, tokenizer = _start(corpus, corpus.sha256(), kind, vocab_size, val_fraction, tokenizer)
    arrays: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for split, ids in encode_stream(corpus, tokenizer, header["n_train_chars"], header["n_bytes"]):
        arrays[split].append(ids)
    dtype = np.dtype(header["dtype"])
    train, val = (np.concatenate([np.zeros(0, dtype), *arrays[s]]) for s in ("train", "val"))
    header.update({"n_tokens": len(train) + len(val), "n_train": len(train)})
    _log_done(header, t0)
    return Shard(tokenizer, train, val, header)


def write_shard(corpus, sha256, kind, vocab_size, val_fraction, bin_path, tokenizer=None) -> None:
    """Encode the corpus into ``bin_path`` and then its JSON header (with both digests)."""
    t0 = time.perf_counter()
    header, tokenizer = _start(corpus, sha256, kind, vocab_size, val_fraction, tokenizer)
    counts = {"train": 0, "val": 0}
    digest = hashlib.sha256()

    def write(f) -> None:
        for split, ids in encode_stream(
            corpus, tokenizer, header["n_train_chars"], header["n_bytes"]
        ):
            counts[split] += len(ids)
            data = ids.tobytes()
            digest.update(data)
            f.write(data)

    with _writing(bin_path):
        atomic_write(bin_path, write)
        header.update({"n_tokens": counts["train"] + counts["val"], "n_train": counts["train"]})
        header["bin_sha256"] = digest.hexdigest()
        header["header_sha256"] = _header_digest(header)
        atomic_write_bytes(header_path(bin_path), (json.dumps(header, indent=1) + "\n").encode())
    _log_done(header, t0)


# --------------------------------------------------------------------------- the cache
def _spec(kind: str, vocab_size: int | None, tokenizer: Tokenizer | None) -> dict:
    if tokenizer is not None:  # a given tokenizer (a checkpoint's): keyed by its contents
        state = json.dumps(tokenizer.state_dict(), sort_keys=True)
        return {"tokenizer": hashlib.sha256(state.encode()).hexdigest()}
    return {"tokenizer": kind, "vocab_size": vocab_size if kind == "bpe" else None}


def shard_path(cache_dir, kind: str, sha256: str, spec: dict, val_fraction: float) -> Path:
    key = json.dumps(
        {"format": FORMAT, "source": sha256, **spec, "split": val_fraction}, sort_keys=True
    )
    return Path(cache_dir) / f"tokens-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.bin"


def header_path(bin_path: Path) -> Path:
    return bin_path.with_suffix(".json")


def _header_digest(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_shard(bin_path: Path, sha256: str, verify: bool = True) -> Shard | None:
    """The shard if its header parses, passes its digest, matches the source, and its
    ``.bin`` has the size and (``verify``) the sha256 the header says; None otherwise (the
    caller rebuilds)."""
    try:
        header = json.loads(header_path(bin_path).read_text(encoding="utf-8"))
        dtype = np.dtype(header["dtype"])
        n_tokens, n_train = int(header["n_tokens"]), int(header["n_train"])
        if header["format"] != FORMAT or header["source_sha256"] != sha256:
            return None
        if header.get("header_sha256") != _header_digest(header):
            return None
        if not bin_path.is_file() or bin_path.stat().st_size != n_tokens * dtype.itemsize:
            return None
        if verify and _file_sha256(bin_path) != header["bin_sha256"]:
            return None
        tokenizer = tokenizer_from_state(header["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):
        return None
    if not 0 <= n_train <= n_tokens:
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
def _writing(bin_path: Path):
    """A cache folder that cannot be written, a full disk, a file-size limit or Ctrl-C while
    preparing: one line naming it (no token file is left: the writes are atomic)."""
    folder = bin_path.parent
    try:
        yield
    except KeyboardInterrupt:
        raise UserError(
            f"interrupted while preparing {bin_path.name}: nothing was kept; run it again"
        ) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = "the disk is full"
        elif e.errno == errno.EFBIG:
            why = "the file size limit (ulimit -f) was reached"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            why = f"it cannot be written ({e.strerror})"
        else:
            raise
        raise UserError(
            f"the token file cannot be written in data.cache_dir {str(folder)!r}: {why}. Free "
            "space, or pass another folder with data.cache_dir=DIR (data.cache_dir=null keeps "
            "the tokens in memory); nothing was kept."
        ) from None


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path`` (one process prepares; the others wait, then read)."""
    import fcntl

    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_or_prepare(
    corpus: Corpus,
    kind: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
) -> Shard:
    """The corpus's shard: read from ``cache_dir`` if a sound one is there, else prepared (and
    written there; with no ``cache_dir``, held in memory)."""
    if cache_dir is None:
        return prepare_in_memory(corpus, kind, vocab_size, val_fraction, tokenizer)
    kind = tokenizer.kind if tokenizer is not None else kind
    sha256 = corpus.sha256()
    source_key = json.dumps({"sha256": sha256, **corpus.key()}, sort_keys=True)
    source_key = hashlib.sha256(source_key.encode()).hexdigest() if corpus.key() else sha256
    if tokenizer is not None:  # the file a run with this tokenizer made from this corpus
        own = _spec(kind, tokenizer.vocab_size, None)
        shard = read_shard(shard_path(cache_dir, kind, source_key, own, val_fraction), sha256)
        if shard is not None and shard.tokenizer == tokenizer:
            return shard
    bin_path = shard_path(
        cache_dir, kind, source_key, _spec(kind, vocab_size, tokenizer), val_fraction
    )
    shard = read_shard(bin_path, sha256)
    if shard is not None:
        return shard
    with _locked(bin_path.with_suffix(".lock")):
        shard = read_shard(bin_path, sha256)  # another process made it meanwhile
        if shard is None:
            header_path(bin_path).unlink(missing_ok=True)  # damaged or stale: never trusted
            write_shard(corpus, sha256, kind, vocab_size, val_fraction, bin_path, tokenizer)
            shard = read_shard(bin_path, sha256, verify=False)  # its digest was just taken
    if shard is None:
        raise UserError(f"the token file {bin_path} could not be read back after writing it")
    return shard


def _log_done(header: dict, t0: float) -> None:
    seconds = time.perf_counter() - t0
    log.info(
        f"prepared {header['n_bytes'] / 1e6:,.1f} MB into {header['n_tokens']:,} "
        f"{header['tokenizer']['kind']} tokens ({header['dtype']}) in {seconds:.1f} s, "
        f"{header['n_bytes'] / 1e6 / max(seconds, 1e-9):,.1f} MB/s"
    )

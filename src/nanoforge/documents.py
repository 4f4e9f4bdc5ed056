"""Documents, streamed from files: what a corpus is made of.

A corpus is a sequence of *documents* (a text file, a JSON Lines row, a Parquet row, a row of a
Hugging Face dataset). They are read as a stream of pieces, never all at once: a piece is
``(text, end)``, where ``end`` says the piece closes its document (a large text file comes in
blocks, its last block ending it). Formats, by file name:

- ``.txt`` / ``.md`` (and any file given by itself): the file is one UTF-8 document;
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, its ``text_field`` the
  document (``zstandard`` reads ``.zst``);
- ``.parquet``: a string column ``text_field``, read one row group at a time (``pyarrow``), so
  memory stays flat however large the file.

Reading is strict: bytes that are not UTF-8, a line that is not JSON, a row whose field is
missing or not a string, a truncated archive end in a :class:`UserError` naming the file and
the row (1-based line for JSON Lines, 0-based row index for Parquet) and the fix.
"""

from __future__ import annotations

import codecs
import errno
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from nanoforge.errors import UserError

BLOCK = 8 << 20  # bytes read at a time from a text file
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

Piece = tuple[str, bool]  # (text, this piece ends its document)


def file_format(path: Path) -> str:
    """``text``, ``jsonl`` or ``parquet``, from the file name (anything else reads as text)."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _loop_error(path: Path, e: OSError) -> UserError:
    if e.errno == errno.ELOOP:
        return UserError(
            f"data.path {str(path)!r} is a symbolic link loop: point data.path at the real "
            "file or folder."
        )
    return UserError(f"data.path {str(path)!r} cannot be read ({e.strerror}).")


def find_files(path: str | os.PathLike, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """``path`` itself when it is a file, else every file under it whose name ends in one of
    ``suffixes``, sorted (a folder may mix formats)."""
    p = Path(path).expanduser()
    try:
        p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise UserError(f"data.path {str(p)!r} is a broken symbolic link.") from None
        raise UserError(
            f"data.path {str(p)!r} does not exist. Pass an existing file or directory."
        ) from None
    except OSError as e:
        raise _loop_error(p, e) from None
    if not p.is_dir():
        return [p]
    try:
        files = sorted(f for f in p.rglob("*") if f.name.lower().endswith(suffixes) and f.is_file())
    except OSError as e:
        raise _loop_error(p, e) from None
    if not files:
        raise UserError(
            f"data.path {str(p)!r} is a directory with no {'/'.join(suffixes)} files. "
            "Put documents in it or point data.path at a file."
        )
    return files


# --------------------------------------------------------------------------- text files
def _not_utf8(path: Path, offset: int, byte: int) -> UserError:
    return UserError(
        f"{path} is not UTF-8 text: byte offset {offset} (0x{byte:02x}) cannot be decoded. "
        "Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass another data.path."
    )


def text_pieces(path: Path) -> Iterator[Piece]:
    """A text file as one document, decoded block by block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        block = f.read(BLOCK)
        while True:
            following = f.read(BLOCK) if block else b""
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not following)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset - pending + e.start, e.object[e.start]) from None
            if "\x00" in text:
                raise UserError(
                    f"{path} contains NUL bytes: it looks like a binary file, not text."
                )
            yield text, not following
            if not following:
                return
            offset += len(block)
            block = following


# --------------------------------------------------------------------------- JSON Lines
def _zst_chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a ``.zst`` file (any number of frames); a file cut short
    raises EOFError (a stream reader would end quietly)."""
    try:
        import zstandard
    except ImportError:
        raise UserError(
            f"{path} is zstandard-compressed: install the data extra (pip install "
            "'nanoforge[data]') or decompress it (zstd -d)."
        ) from None
    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            fed = True
            while block:
                yield dobj.decompress(block)
                block = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj, fed = dctx.decompressobj(), bool(block)
    if fed and not dobj.eof:
        raise EOFError("the compressed stream ends inside a frame")


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of a ``.jsonl`` file, plain, gzip- or zstandard-compressed."""
    name = path.name.lower()
    if name.endswith(".zst"):
        rest = b""
        for chunk in _zst_chunks(path):
            *lines, rest = (rest + chunk).split(b"\n")
            yield from lines
        if rest:
            yield rest
        return
    with gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb") as f:
        yield from f


def _field(row, field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object: each line must be {{{field!r}: ...}}.")
    text = row.get(field)
    if not isinstance(text, str):
        what = "has no" if field not in row else f"has a non-string ({type(text).__name__}) in its"
        raise UserError(
            f"{where} {what} {field!r} field (a string is needed): fix the row, or name the "
            f"text field with data.text_field=NAME (its fields: {', '.join(map(str, row))[:200]})."
        )
    return text


def _corrupt(e: BaseException) -> bool:
    """A cut or damaged archive (not a disk error: those keep their own message)."""
    if isinstance(e, OSError):
        return e.errno is None  # gzip's "Not a gzipped file", a CRC error
    return isinstance(e, EOFError | zlib.error) or type(e).__name__ == "ZstdError"


def jsonl_pieces(path: Path, field: str) -> Iterator[Piece]:
    """One document per line; blank lines are skipped."""
    line_no = 0
    lines = _lines(path)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except Exception as e:
            if not _corrupt(e):
                raise
            raise UserError(
                f"{path} is truncated or corrupt after line {line_no} ({e}): download or "
                "compress it again."
            ) from None
        line_no += 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(
                f"{path} line {line_no} is not valid JSON ({e}): fix or remove the line."
            ) from None
        yield _field(row, field, f"{path} line {line_no}"), True


# --------------------------------------------------------------------------- Parquet
def parquet_pieces(path: Path, field: str) -> Iterator[Piece]:
    """One document per row of column ``field``, one row group in memory at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{path} is Parquet: install the data extra (pip install 'nanoforge[data]')."
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise UserError(f"{path} is not a readable Parquet file ({e}).") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(
            f"{path} has no column {field!r} (its columns: {', '.join(names)}): name the text "
            "column with data.text_field=NAME."
        )
    row = 0
    for group in range(pf.num_row_groups):
        column = pf.read_row_group(group, columns=[field]).column(0)
        for value in column.to_pylist():
            if not isinstance(value, str):
                raise UserError(
                    f"{path} row {row} has {'no' if value is None else 'a non-string'} "
                    f"{field!r} value: fix the row or name another data.text_field."
                )
            yield value, True
            row += 1


# --------------------------------------------------------------------------- any file
def file_pieces(path: Path, field: str = "text") -> Iterator[Piece]:
    """The documents of one file, by its format."""
    fmt = file_format(path)
    if fmt == "jsonl":
        return jsonl_pieces(path, field)
    if fmt == "parquet":
        return parquet_pieces(path, field)
    return text_pieces(path)


def limit_chars(pieces: Iterator[Piece], max_chars: int | None) -> Iterator[Piece]:
    """The stream cut after ``max_chars`` characters (the last document cut there, and ended)."""
    if not max_chars:
        yield from pieces
        return
    left = int(max_chars)
    for text, end in pieces:
        if len(text) >= left:
            yield text[:left], True
            return
        left -= len(text)
        yield text, end


# --------------------------------------------------------------------------- HF datasets
def _load_dataset(folder: Path | None, options: dict):
    try:
        import datasets
    except ImportError:
        raise UserError(
            "data=hf reads through the `datasets` library: install the data extra "
            "(pip install 'nanoforge[data]')."
        ) from None
    split = options.get("split") or "train"
    try:
        if folder is not None:
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(
                        f"{folder} has no split {split!r} (it has {', '.join(ds)}): pass "
                        "data.split=NAME."
                    )
                ds = ds[split]
            return ds
        return datasets.load_dataset(
            options["name"], options.get("config"), split=split, streaming=True
        )
    except UserError:
        raise
    except Exception as e:  # offline without a cached copy, a wrong name, config or split
        what = str(folder) if folder is not None else repr(options.get("name"))
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"the Hugging Face dataset {what} cannot be opened ({first}). Check data.name, "
            "data.config and data.split; offline (HF_DATASETS_OFFLINE=1) it must be in the "
            "local Hugging Face cache, or pass data.path=DIR of a save_to_disk folder."
        ) from None


def dataset_pieces(folder: Path | None, field: str, options: dict) -> Iterator[Piece]:
    """One document per row of a Hugging Face dataset: streamed from the hub (or its local
    cache), or read in batches from a ``save_to_disk`` folder (memory-mapped Arrow)."""
    ds = _load_dataset(folder, options)
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise UserError(
            f"the dataset has no column {field!r} (its columns: {', '.join(columns)}): name "
            "the text column with data.text_field=NAME."
        )
    rows = (
        (v for batch in ds.iter(batch_size=1024) for v in batch[field])
        if folder is not None
        else (row.get(field) for row in ds)
    )
    for i, value in enumerate(rows):
        if not isinstance(value, str):
            raise UserError(
                f"row {i} of the dataset has no string {field!r}: name the text column with "
                "data.text_field=NAME."
            )
        yield value, True

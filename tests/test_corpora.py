"""nanoforge.corpora: where the text comes from.

The embedded Shakespeare plays (markdown turned into tiny-Shakespeare-style text), any file or
folder of documents (bad paths and bytes are UserErrors naming the file and offset; the formats
themselves: test_documents.py), and tiny Shakespeare downloaded once, checked against its
sha256 and cached. Each corpus is read through ``open_corpus``, the way training reads it.
"""

import io

import pytest

from nanoforge import corpora, shards
from nanoforge.corpora import (
    TINYSHAKESPEARE_SHA256,
    load_shakespeare_plays,
    markdown_play_to_text,
    open_corpus,
)
from nanoforge.errors import UserError


def read(name, path=None, cache_dir=None) -> str:
    """The text a character run trains on: the corpus's documents, as preparation streams them."""
    return "".join(shards.stream(open_corpus(name, path, cache_dir), eot=False))


PLAY = """# Macbeth

## ACT I

## SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**|
When shall we three meet again|
In thunder, lightning, or in rain?

_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant_

**MACBETH**|
_\\[Aside]_|
The Prince of Cumberland! that is a step--|
On which I must fall down.

_Exit_

**PAGE**|
[Within]_|
Who's there?
""".replace("|\n", "  \n")  # markdown hard breaks: two trailing spaces


def test_markdown_play_becomes_tiny_shakespeare_style():
    text = markdown_play_to_text(PLAY)
    assert text == (
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "MACBETH:\nThe Prince of Cumberland! that is a step--\nOn which I must fall down.\n\n"
        "PAGE:\nWho's there?"
    )


def test_embedded_corpus_is_plain_text_with_speakers():
    text = load_shakespeare_plays()
    assert len(text) > 4_000_000  # 38 plays
    assert "\nROMEO:\n" in text and "\nHAMLET:\n" in text
    for markup in ("**", "_", "#", "\\", "[", "]"):
        assert markup not in text, markup
    assert text == load_shakespeare_plays()  # same text every time (sorted files)


def test_embedded_corpus_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    from nanoforge import corpora

    path = corpora.shakespeare_plays_file(tmp_path)
    assert path.read_text(encoding="utf-8") == load_shakespeare_plays()
    assert open_corpus("shakespeare", None, tmp_path).parts == [path]

    def no_conversion(files):
        raise AssertionError("converted again")

    monkeypatch.setattr(corpora, "_convert_plays", no_conversion)
    assert corpora.shakespeare_plays_file(tmp_path) == path  # the cached file is reused
    # another converter (this module's source is part of the key) makes another file
    monkeypatch.setattr(corpora, "__file__", str(tmp_path / "edited_corpora.py"))
    (tmp_path / "edited_corpora.py").write_text("# an edited converter\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="converted again"):
        corpora.shakespeare_plays_file(tmp_path)


def test_text_corpus_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "skip.py").write_text("not a document", encoding="utf-8")
    assert read("text", tmp_path) == "first\n\n\nsecond\n"
    assert read("text", tmp_path / "a.txt") == "first\n"


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "no .txt/.md/.jsonl"),
        (lambda p: (p / "e.txt").write_text("  \n") and p / "e.txt", "empty"),
        (lambda p: (p / "bin.txt").write_bytes(b"abc\x00\x01\x02") and p / "bin.txt", "binary"),
    ],
)
def test_bad_paths_are_clear_errors(tmp_path, setup, expected):
    with pytest.raises(UserError, match=expected):
        shards.scan(open_corpus("text", setup(tmp_path)), want_chars=True, eot=False)


def test_invalid_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf" + b"\xe9 au lait")
    with pytest.raises(UserError) as e:
        read("text", p)
    assert str(p) in str(e.value) and "byte offset 3" in str(e.value)


def test_text_corpus_needs_a_path():
    with pytest.raises(UserError, match="data.path"):
        open_corpus("text", None, None)


def test_tinyshakespeare_offline_says_to_pass_data_path(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(corpora.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="data.path"):
        open_corpus("tinyshakespeare", None, tmp_path)
    assert list(tmp_path.iterdir()) == []


class Resp(io.BytesIO):
    """What urllib.request.urlopen returns, serving fixed bytes."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_tinyshakespeare_wrong_hash_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora.urllib.request, "urlopen", lambda *a, **k: Resp(b"not it"))
    with pytest.raises(UserError, match="sha256"):
        open_corpus("tinyshakespeare", None, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tinyshakespeare_good_download_is_cached(tmp_path, monkeypatch):
    data = b"pretend corpus\n"
    monkeypatch.setattr(corpora, "TINYSHAKESPEARE_SHA256", corpora.sha256_bytes(data))
    calls = []
    monkeypatch.setattr(
        corpora.urllib.request, "urlopen", lambda *a, **k: calls.append(1) or Resp(data)
    )
    assert read("tinyshakespeare", None, tmp_path) == data.decode()
    assert read("tinyshakespeare", None, tmp_path) == data.decode()
    assert len(calls) == 1  # the second read came from the cache
    assert [p.name for p in tmp_path.iterdir()] == ["tinyshakespeare.txt"]
    assert TINYSHAKESPEARE_SHA256.startswith("86c4e6aa")


def test_pycode_is_the_standard_library_without_its_tests(monkeypatch, tmp_path):
    from nanoforge.corpora import stdlib_dir

    files = open_corpus("pycode").parts
    assert (stdlib_dir() / "os.py") in files and len(files) > 300
    assert all(p.suffix == ".py" for p in files)
    rel = [p.relative_to(stdlib_dir()).parts for p in files]
    assert not any("test" in r or "tests" in r or "site-packages" in r for r in rel)
    # an installation without the .py sources: a clear error
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(UserError, match=r"data=pycode needs the Python standard library"):
        open_corpus("pycode")

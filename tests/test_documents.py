"""nanoforge.documents: documents streamed from text, JSON Lines (plain, .gz, .zst) and Parquet
files, and from Hugging Face datasets, read as training reads them (``open_corpus`` ->
``shards.load_or_prepare``).

The same documents in any format make one byte-identical token file; ``data.text_field`` names
the field; a bad row, bad JSON, a truncated archive or a missing column is one UserError naming
the file and the row, with nothing left in the cache folder.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from nanoforge import shards
from nanoforge.corpora import open_corpus
from nanoforge.errors import UserError
from tests.helpers import make_text

DOCS = [make_text(1500, seed=i) + ("naïve café 東京 🙂" if i % 3 == 0 else "") for i in range(24)]


def write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}, ensure_ascii=i % 2 == 0) + "\n")
    return path


def write_zst(path, docs):
    import zstandard

    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def write_parquet(path, docs, field="text", row_group_size=5):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs}), path, row_group_size=row_group_size)
    return path


def tokens(path, tmp_path, kind="bpe", **kw):
    cache = tmp_path / "cache"
    shard = shards.load_or_prepare(open_corpus("text", path, **kw), kind, 300, 0.1, cache)
    return shard.path.read_bytes(), shard


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    return {
        "jsonl": write_jsonl(d / "docs.jsonl", DOCS),
        "gz": write_jsonl(d / "docs.jsonl.gz", DOCS, opener=gzip.open),
        "zst": write_zst(d / "docs.jsonl.zst", DOCS),
        "parquet": write_parquet(d / "docs.parquet", DOCS),
    }


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_same_documents_in_every_format_make_one_token_file(formats, tmp_path, kind):
    made = {name: tokens(p, tmp_path / name, kind)[0] for name, p in formats.items()}
    assert len(set(made.values())) == 1
    # a folder of one text file per document: the same tokens too
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    assert tokens(folder, tmp_path / "txt-cache", kind)[0] == made["jsonl"]


def test_bpe_documents_end_with_eot_and_chars_are_joined_by_blank_lines(formats, tmp_path):
    _, shard = tokens(formats["jsonl"], tmp_path)
    ids = np.concatenate([shard.train, shard.val])
    tok = shard.tokenizer
    assert (ids == tok.eot_id).sum() == len(DOCS) and ids[-1] == tok.eot_id
    docs = tok.decode(ids).split("<|endoftext|>")
    assert docs == [*DOCS, ""]
    _, chars = tokens(formats["jsonl"], tmp_path / "c", "char")
    text = chars.tokenizer.decode(np.concatenate([chars.train, chars.val]))
    assert text == "\n\n".join(DOCS)


def test_a_mixed_folder_reads_in_sorted_order_and_text_field_names_the_field(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", DOCS[:3], field="content")
    write_parquet(folder / "a.parquet", DOCS[3:6], field="content")
    (folder / "c.md").write_text(DOCS[6], encoding="utf-8")
    _, shard = tokens(folder, tmp_path, text_field="content")
    text = shard.tokenizer.decode(np.concatenate([shard.train, shard.val]))
    assert text.split("<|endoftext|>")[:-1] == DOCS[3:6] + DOCS[:3] + DOCS[6:7]
    with pytest.raises(UserError, match="data.text_field"):
        tokens(folder, tmp_path / "other")  # field "text" is not there


def test_max_chars_reads_the_first_characters_only(formats, tmp_path):
    _, shard = tokens(formats["parquet"], tmp_path, max_chars=2000)
    assert shard.header["n_chars"] == 2000


def _truncated_gz(p):
    write_jsonl(p, DOCS, opener=gzip.open)
    p.write_bytes(p.read_bytes()[:-200])


def _truncated_zst(p):
    write_zst(p, DOCS)
    p.write_bytes(p.read_bytes()[:-200])


BAD = [
    (
        "bad.jsonl",
        lambda p: p.write_text('{"text": "ok"}\n{"text": 3}\n'),
        r"line 2 has a non-string \(int\)",
    ),
    ("bad.jsonl", lambda p: p.write_text('{"text": "ok"}\n\n{"txt": "x"}\n'), r"line 3 has no"),
    ("bad.jsonl", lambda p: p.write_text('{"text": "ok"}\n{"text": "cut\n'), r"line 2 is not val"),
    ("bad.jsonl.gz", _truncated_gz, r"truncated or corrupt"),
    ("bad.jsonl.zst", _truncated_zst, r"truncated or corrupt"),
    ("bad.parquet", lambda p: write_parquet(p, ["a", None, "c"]), r"row 1 has no 'text'"),
    ("bad.parquet", lambda p: write_parquet(p, ["a"], field="body"), r"no column 'text'"),
]


@pytest.mark.parametrize("name, make, message", BAD, ids=[b[2] for b in BAD])
def test_a_bad_row_is_one_error_naming_file_and_row_and_nothing_is_left(
    tmp_path, name, make, message
):
    path = tmp_path / name
    make(path)
    with pytest.raises(UserError, match=message) as e:
        tokens(path, tmp_path)
    assert str(path) in str(e.value)
    left = [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]
    assert left == []  # no token file, no header, no temporary file


def test_a_symlink_loop_as_data_path_is_one_error(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match="symbolic link loop"):
        open_corpus("text", loop)


def test_hf_dataset_saved_to_disk(tmp_path):
    """data=hf data.path=DIR reads a save_to_disk folder (a DatasetDict's split) into the same
    tokens as the JSONL of the same documents; a missing split is one clear line."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}),
            "test": datasets.Dataset.from_dict({"text": ["x"], "n": [0]}),
        }
    )
    dd.save_to_disk(str(folder))
    hf = shards.load_or_prepare(open_corpus("hf", folder, hf={"split": "train"}), "bpe", 300)
    jsonl = shards.load_or_prepare(
        open_corpus("text", write_jsonl(tmp_path / "d.jsonl", DOCS)), "bpe", 300
    )
    assert np.array_equal(hf.train, jsonl.train) and np.array_equal(hf.val, jsonl.val)
    # another column of the same folder is another token file
    dd["train"].rename_column("text", "body").add_column("text", ["y"] * len(DOCS)).save_to_disk(
        str(tmp_path / "two-columns")
    )
    two = tmp_path / "two-columns"
    cache = tmp_path / "cache"
    body = shards.load_or_prepare(open_corpus("hf", two, text_field="body"), "bpe", 300, 0.1, cache)
    text = shards.load_or_prepare(open_corpus("hf", two), "bpe", 300, 0.1, cache)
    assert body.path != text.path and len(body.train) > 10 * len(text.train)
    with pytest.raises(UserError, match="no split 'validation'"):
        shards.load_or_prepare(open_corpus("hf", folder, hf={"split": "validation"}), "char")


def test_hf_dataset_by_name_is_streamed(monkeypatch):
    """data=hf data.name=...: the dataset is asked for in streaming mode (here a local
    IterableDataset from a generator stands in for the hub); a dataset that cannot be opened
    (offline, no cached copy) is one line saying what to check."""
    datasets = pytest.importorskip("datasets")
    asked = []

    def load_dataset(name, config=None, split=None, streaming=False):
        asked.append((name, config, split, streaming))
        if name != "org/corpus":
            raise ConnectionError(f"Couldn't reach {name!r} on the Hub (LocalEntryNotFoundError)")
        return datasets.IterableDataset.from_generator(lambda: ({"text": d} for d in DOCS))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hf = {"name": "org/corpus", "config": "sample", "split": "train"}
    shard = shards.load_or_prepare(open_corpus("hf", hf=hf), "char")
    assert asked == [("org/corpus", "sample", "train", True)] * 2  # scan, encode: streamed
    text = shard.tokenizer.decode(np.concatenate([shard.train, shard.val]))
    assert text == "\n\n".join(DOCS)
    with pytest.raises(UserError, match="cannot be opened.*HF_DATASETS_OFFLINE"):
        shards.load_or_prepare(open_corpus("hf", hf={"name": "nobody/nothing"}), "char")

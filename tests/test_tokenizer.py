"""nanoforge.tokenizer: the character-level tokenizer and the byte-level BPE.

The vocabulary is the sorted set of the corpus's characters (the same in every process);
text round-trips; characters it never saw are a UserError that lists them; its state
round-trips through a checkpoint, and a foreign state is refused.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoforge.errors import UserError
from nanoforge.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_state
from tests.helpers import ROOT, make_text

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def test_roundtrip_and_sorted_vocab():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.chars == sorted(set(TEXT))
    assert tok.vocab_size == len(set(TEXT))
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int64 and len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    # ids are indices into the sorted vocabulary
    assert ids[0] == tok.chars.index("F")


def test_unseen_characters_error_lists_them():
    tok = CharTokenizer.from_text(TEXT)
    with pytest.raises(UserError) as e:
        tok.encode("Hear me, Zeus! ~")
    msg = str(e.value)
    assert "'Z'" in msg and "'~'" in msg and "never saw" in msg
    assert tok.unknown_chars("Zz~") == ["Z", "~"]  # 'z' is in "Citizen"


def test_vocabulary_identical_across_processes(tmp_path):
    """The vocabulary must not depend on string hashing (PYTHONHASHSEED) or the process."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(5000, seed=3), encoding="utf-8")
    code = (
        "import json,sys; sys.path.insert(0,'src');"
        "from nanoforge.tokenizer import CharTokenizer;"
        f"text = open({str(corpus)!r}, encoding='utf-8').read();"
        "print(json.dumps(CharTokenizer.from_text(text).chars))"
    )
    outs = set()
    for hashseed in ("1", "2", "random"):
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": hashseed, "PATH": ""},
            cwd=ROOT,
            check=True,
        )
        outs.add(r.stdout.strip())
    assert len(outs) == 1
    assert json.loads(outs.pop()) == sorted(set(make_text(5000, seed=3)))


def test_state_dict_roundtrip_and_foreign_state_rejected():
    tok = CharTokenizer.from_text(TEXT)
    again = CharTokenizer.from_state_dict(tok.state_dict())
    assert again == tok and again.decode(again.encode(TEXT)) == TEXT
    with pytest.raises(UserError):
        CharTokenizer.from_state_dict({"type": "bpe", "merges": []})


def test_non_ascii_characters():
    text = "naïve café — ὦ Ζεῦ 🙂"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_any_string_over_the_vocabulary_roundtrips(s):
    tok = CharTokenizer.from_text(s)
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert ids.min() >= 0 and ids.max() < tok.vocab_size


def test_char_state_is_tagged_and_old_checkpoint_states_still_load():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.state_dict() == {"kind": "char", "chars": "".join(tok.chars)}
    legacy = {"type": "char", "chars": "".join(tok.chars)}  # before the BPE tokenizer
    assert tokenizer_from_state(legacy) == tok == tokenizer_from_state(tok.state_dict())
    with pytest.raises(UserError, match="unknown kind"):
        tokenizer_from_state({"kind": "sentencepiece"})


# --------------------------------------------------------------------------- byte-level BPE
CORPUS = make_text(20_000, seed=1)
BPE = BPETokenizer.train([CORPUS], vocab_size=320)


def test_bpe_trains_to_the_asked_size_and_compresses():
    assert BPE.vocab_size == 320
    ids = BPE.encode(CORPUS)
    assert ids.dtype == np.int64 and len(ids) < len(CORPUS) / 2
    assert BPE.decode(ids) == CORPUS
    assert BPE.unknown_chars("東京 🙂") == []  # byte-level: nothing is unknown
    with pytest.raises(UserError, match="vocab_size"):
        BPETokenizer.train([CORPUS], vocab_size=200)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trips_any_unicode(s):
    ids = BPE.encode(s)
    assert BPE.decode(ids) == s
    assert len(ids) == 0 or (ids.min() >= 0 and ids.max() < BPE.vocab_size)


def test_bpe_state_is_plain_data_and_round_trips():
    state = BPE.state_dict()
    assert state["kind"] == "bpe" and isinstance(state["tokenizer_json"], str)
    again = tokenizer_from_state(state)
    assert isinstance(again, BPETokenizer) and again == BPE
    assert again.encode(CORPUS).tolist() == BPE.encode(CORPUS).tolist()
    # the Hugging Face JSON: GPT-2's byte-level pre-tokenizer and decoder
    hf = json.loads(BPE.to_hf_json())
    assert hf["model"]["type"] == "BPE"
    assert hf["pre_tokenizer"]["type"] == "ByteLevel" and hf["decoder"]["type"] == "ByteLevel"
    assert BPETokenizer.from_hf_json(BPE.to_hf_json()) == BPE
    with pytest.raises(UserError, match="cannot be read"):
        BPETokenizer.from_hf_json("{not json")


def test_bpe_training_is_deterministic():
    assert BPETokenizer.train([CORPUS], vocab_size=320) == BPE


def test_eot_is_the_last_id_and_stands_for_no_bytes():
    """<|endoftext|> ends every document: the last id, never produced by encoding text (even
    text that spells it), and 0 bytes in bits per byte."""
    assert BPE.eot_id == BPE.vocab_size - 1
    assert BPE.eot_id not in BPE.encode("a<|endoftext|>b").tolist()
    assert BPE.token_bytes()[BPE.eot_id] == 0
    assert BPE.decode([BPE.eot_id]) == "<|endoftext|>"
    assert CharTokenizer.from_text("ab").eot_id is None


def test_tiktoken_encodes_as_the_tokenizers_json_says():
    """The checkpoint keeps the tokenizers JSON; tiktoken (the fast path) and the tokenizers
    library reading that JSON give the same ids."""
    slow = BPETokenizer.from_hf_json(BPE.to_hf_json())
    assert BPE.fast and not slow.fast
    text = CORPUS[:3000] + " naïve café 東京 🙂 x_y 3.14\n\n  end  "
    assert slow.encode(text).tolist() == BPE.encode(text).tolist()
    assert [a.tolist() for a in BPE.encode_batch([text, "x"], 2)] == [
        slow.encode(text).tolist(),
        slow.encode("x").tolist(),
    ]


def test_a_vocab_size_the_corpus_cannot_fill_says_what_it_came_out_as(caplog):
    with caplog.at_level("WARNING"):
        tok = BPETokenizer.train(["ab ab ab cd"], vocab_size=4096)
    assert tok.vocab_size < 4096 and tok.eot_id == tok.vocab_size - 1
    assert f"came out as {tok.vocab_size:,} tokens" in caplog.text


def test_a_large_character_vocabulary_suggests_bpe(caplog):
    with caplog.at_level("WARNING"):
        CharTokenizer([chr(c) for c in range(0x4E00, 0x4E00 + 200)]).warn_if_large()
        assert caplog.text == ""
        CharTokenizer([chr(c) for c in range(0x4E00, 0x4E00 + 1952)]).warn_if_large()
    assert "1,952" in caplog.text and "tokenizer=bpe" in caplog.text

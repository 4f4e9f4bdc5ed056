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

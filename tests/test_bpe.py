"""nanoforge.bpe: the plain-Python BPE trainer (the lesson), checked by hand and against the
library that ``tokenizer=bpe`` uses."""

from __future__ import annotations

from nanoforge import bpe
from nanoforge.tokenizer import BPETokenizer


def test_merges_worked_out_by_hand():
    # words: "aaab" x1, " aaab" x1 ... written small enough to count on paper:
    # text "ab ab abc": words "ab", " ab", " abc" -> bytes (97,98) (32,97,98) (32,97,98,99)
    # pair counts: (97,98)=3, (32,97)=2, (98,99)=1 -> merge 256 = "ab"
    # then: (32,256)=2, (256,99)=1 -> merge 257 = " ab"
    # then: (257,99)=1 is the only pair -> merge 258 = " abc"
    merges = bpe.train("ab ab abc", vocab_size=259)
    assert merges == [(97, 98), (32, 256), (257, 99)]
    ids = bpe.encode("ab ab abc", merges)
    assert ids == [256, 257, 258]
    assert bpe.decode(ids, merges) == "ab ab abc"
    # a word never seen falls back to merges it contains, then to bytes
    assert bpe.encode(" abd", merges) == [257, 100]
    # ties go to the smallest pair: "xy" and "yz" both occur once in "xyz"
    assert bpe.train("xyz", vocab_size=257) == [(120, 121)]


def test_round_trip_including_non_ascii():
    text = "naïve café — 東京 🙂 x_y 3.14\n\n  end"
    merges = bpe.train(text * 3, vocab_size=300)
    assert bpe.decode(bpe.encode(text, merges), merges) == text


def test_scratch_and_fast_trainers_learn_the_same_merges_and_tokens():
    """The lesson is the real thing: on a slice of the embedded corpus, rustbpe (what
    tokenizer=bpe runs) learns exactly the plain-Python merges, in the same order, and
    tiktoken encodes exactly as the plain encoder does."""
    from nanoforge.corpora import load_shakespeare_plays

    text = load_shakespeare_plays()[:60_000]
    merges = bpe.train(text, 399)
    fast = BPETokenizer.train([text], 400)  # + <|endoftext|>
    table = {i: bytes([i]) for i in range(256)}
    for k, (a, b) in enumerate(merges):
        table[256 + k] = table[a] + table[b]
    vocab = [fast.decode([i]).encode() for i in range(256, 399)]
    assert vocab == [table[i] for i in range(256, 399)]
    sample = text[:5_000]
    assert fast.encode(sample).tolist() == bpe.encode(sample, merges)
    assert fast.eot_id == 399 and fast.vocab_size == 400

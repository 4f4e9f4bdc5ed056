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


def test_scratch_and_library_compress_shakespeare_alike():
    """At the same vocabulary size, both BPEs cut a slice of the embedded corpus into token
    counts within 3% of each other."""
    from nanoforge.corpora import load_shakespeare_plays

    text = load_shakespeare_plays()[:60_000]
    vocab_size = 400
    scratch = len(bpe.encode(text, bpe.train(text, vocab_size)))
    library = len(BPETokenizer.train([text], vocab_size).encode(text))
    assert abs(scratch - library) / library < 0.03, (scratch, library)
    assert scratch < 0.6 * len(text.encode())  # and both really compress

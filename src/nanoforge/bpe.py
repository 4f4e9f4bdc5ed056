"""Byte-pair encoding from scratch, in plain Python: the lesson behind ``tokenizer=bpe``.

Training is three lines of idea, repeated:

1. split the text into words (GPT-2's rule: a word keeps its leading space) and write each
   word as its UTF-8 bytes, so every text is covered by the 256 byte tokens;
2. count every pair of neighbouring tokens, over all words (weighted by how often each word
   occurs);
3. merge the most frequent pair into one new token everywhere, and go back to 2 until the
   vocabulary has ``vocab_size`` tokens.

Encoding replays the merges in the order they were learned. This is what
:class:`nanoforge.tokenizer.BPETokenizer` does with ``rustbpe`` (learning) and ``tiktoken``
(encoding), in Rust on every core, fast enough for real corpora; this module exists to be
read, and its tests check that both learn the same merges and give the same tokens.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

# GPT-2's pre-tokenizer pattern, written for Python's own `re` (no \p{L}: [^\W\d_] is "a letter")
WORD = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")

Pair = tuple[int, int]


def words(text: str) -> Counter[tuple[int, ...]]:
    """How often each word occurs, each word written as a tuple of byte values."""
    return Counter(tuple(w.encode("utf-8")) for w in WORD.findall(text))


def merge(word: tuple[int, ...], pair: Pair, new_id: int) -> tuple[int, ...]:
    """``word`` with every occurrence of ``pair`` (left to right) replaced by ``new_id``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train(text: str, vocab_size: int) -> list[Pair]:
    """The merges, in the order learned: merge ``k`` makes token ``256 + k``."""
    counts = words(text)
    merges: list[Pair] = []
    while 256 + len(merges) < vocab_size:
        pairs: Counter[Pair] = Counter()
        for word, n in counts.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break  # every word is a single token already
        # the most frequent pair; ties go to the smallest pair, so training is deterministic
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = 256 + len(merges)
        merges.append(best)
        merged: Counter[tuple[int, ...]] = Counter()
        for word, n in counts.items():
            merged[merge(word, best, new_id)] += n
        counts = merged
    return merges


def encode(text: str, merges: list[Pair]) -> list[int]:
    """Token ids of ``text``: each word's bytes, with the merges applied in learned order."""
    rank = {pair: 256 + k for k, pair in enumerate(merges)}
    ids: list[int] = []
    for w in WORD.findall(text):
        word = tuple(w.encode("utf-8"))
        while len(word) > 1:
            # the earliest-learned merge present in the word goes first
            pair = min(itertools.pairwise(word), key=lambda p: rank.get(p, 1 << 30))
            if pair not in rank:
                break
            word = merge(word, pair, rank[pair])
        ids.extend(word)
    return ids


def decode(ids: list[int], merges: list[Pair]) -> str:
    """Text of token ids: each token expands to the bytes it was merged from."""
    table = {i: bytes([i]) for i in range(256)}
    for k, (a, b) in enumerate(merges):
        table[256 + k] = table[a] + table[b]
    return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

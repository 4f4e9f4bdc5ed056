"""Step 1 of building a GPT (the README's table): turn text into integers and back.

Two tokenizers behind one interface (``encode(text) -> np.ndarray``, ``decode(ids) -> str``,
``vocab_size``, ``unknown_chars(text)``, ``state_dict()`` -> a plain dict):

- :class:`CharTokenizer` (``tokenizer=char``, the default): the vocabulary is the *sorted* set
  of characters of the corpus, so it is identical in every process and on every machine (a
  plain ``set`` iterates in an order that changes with string hashing). Encoding is one
  vectorised NumPy pass over the text, not a Python loop over its characters.
- :class:`BPETokenizer` (``tokenizer=bpe``): a byte-level BPE with GPT-2's pre-tokenizer,
  learned by ``rustbpe`` and run by ``tiktoken`` (both Rust, on every core; the fastest pair
  measured, bench/RESULTS.md). Byte-level means any UTF-8 text encodes, with no unknown token.
  Its last id is ``<|endoftext|>`` (:attr:`eot_id`), the token that ends every document. It is
  kept as the Hugging Face ``tokenizers`` JSON (GPT-2's own ``tokenizer.json`` loads too; such
  a foreign vocabulary is run by ``tokenizers`` itself). The few lines that show what BPE does
  are in :mod:`nanoforge.bpe` (a plain-Python trainer, for reading, tested to learn the same
  merges).

A tokenizer travels inside checkpoints as the plain dict of ``state_dict()`` (so checkpoints
load with ``torch.load(weights_only=True)``); :func:`tokenizer_from_state` turns it back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Protocol

import numpy as np

from nanoforge.errors import UserError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer (the `tokenizers` ByteLevel regex), for rustbpe and tiktoken
GPT2_PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# above this many characters, a character vocabulary is mostly rare symbols: BPE fits better
CHAR_VOCAB_WARN = 300


class Tokenizer(Protocol):
    """What the rest of nanoforge needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def unknown_chars(self, text: str) -> list[str]: ...

    def token_bytes(self) -> np.ndarray: ...

    def state_dict(self) -> dict: ...


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in that vocabulary."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise UserError("the tokenizer vocabulary is empty: the corpus has no characters")
        if any(len(c) != 1 for c in chars):
            raise ValueError("a CharTokenizer vocabulary holds single characters only")
        if sorted(set(chars)) != chars:
            raise ValueError("vocabulary must be sorted and free of duplicates; use from_text()")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}
        # code points, sorted (same order as chars), for vectorised encoding
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._ascii_table = np.full(128, -1, dtype=np.int64)  # code point -> id, -1: unknown
        for i, c in enumerate(chars):
            if ord(c) < 128:
                self._ascii_table[ord(c)] = i

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = every distinct character of ``text``, sorted."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    eot_id = None  # characters keep their documents apart with blank lines

    def warn_if_large(self) -> None:
        """Say once when the vocabulary is mostly rare symbols (emoji, box drawing ...): every
        one costs an embedding row and a softmax column, for a few occurrences."""
        if self.vocab_size > CHAR_VOCAB_WARN:
            log.warning(
                f"the corpus has {self.vocab_size:,} distinct characters, so tokenizer=char "
                f"builds a {self.vocab_size:,}-symbol vocabulary (training slows, rare symbols "
                "are barely learned): tokenizer=bpe tokenizer.vocab_size=4096 fits such text "
                "better"
            )

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of ``text`` the vocabulary lacks, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> np.ndarray:
        """Text -> array of token ids (int64). Raises :class:`UserError` on unseen characters."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        if text.isascii():  # the common case: one table lookup per byte
            ids = np.take(self._ascii_table, np.frombuffer(text.encode("ascii"), dtype=np.uint8))
            if ids.min() >= 0:
                return ids
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, cps)
        ids_clipped = np.minimum(ids, len(self._codepoints) - 1)
        bad = self._codepoints[ids_clipped] != cps
        if bad.any():
            unknown = self.unknown_chars(text)
            shown = ", ".join(repr(c) for c in unknown[:20])
            more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
            raise UserError(
                f"the text has {len(unknown)} character(s) the tokenizer never saw: {shown}{more}. "
                "Remove them from the text, or train on a corpus that contains them."
            )
        return ids_clipped.astype(np.int64)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each token (for bits per byte)."""
        return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids -> text."""
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    # --- serialisation: a plain dict, so checkpoints load with torch.load(weights_only=True)
    def state_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_state_dict(cls, state: dict) -> CharTokenizer:
        # checkpoints written before the BPE tokenizer said {"type": "char", ...}
        kind = state.get("kind", state.get("type"))
        if kind != "char" or not isinstance(state.get("chars"), str):
            raise UserError("the checkpoint's tokenizer is not a nanoforge CharTokenizer")
        return cls(list(state["chars"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash("".join(self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (``tokenizers``' ByteLevel alphabet): printable
    Latin-1 bytes stand for themselves, the others map to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def merge_pairs(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each token (in rank order), recovered from the ranks alone: BPE
    on the token's bytes with only earlier tokens allowed stops at exactly two parts."""
    pairs = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            scored = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(scored)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} is not the merge of two earlier tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


class BPETokenizer:
    """A byte-level BPE (GPT-2's scheme): learned by ``rustbpe``, run by ``tiktoken``.

    Text is split by GPT-2's pre-tokenizer regex, each piece's UTF-8 bytes start as the 256
    byte tokens, and learned merges join frequent neighbours. Every byte is in the vocabulary,
    so no text is unknown. The tokenizer is kept as ``tokenizers`` JSON (``to_hf_json()``,
    ``from_hf_json()``, GPT-2's ``tokenizer.json`` included); ``fast`` (a vocabulary learned
    here) encodes with ``tiktoken``, which gives the same ids for it, many times faster; a
    foreign vocabulary is run by ``tokenizers``.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer, fast: bool = False):
        self._tok = hf_tokenizer
        self.fast = fast

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``texts`` (pass the *training split only*): ``vocab_size`` tokens
        are the 256 bytes, ``vocab_size - 257`` merges and ``<|endoftext|>`` (the last id).
        A corpus too small for that many merges gives fewer (said in a warning)."""
        import rustbpe

        vocab_size = int(vocab_size)
        if vocab_size < 258:
            raise UserError(
                f"tokenizer.vocab_size={vocab_size} is too small for a byte-level BPE: it needs "
                "the 256 byte tokens, at least one merge and <|endoftext|>. Use e.g. "
                "tokenizer.vocab_size=4096."
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=GPT2_PATTERN)
        tok = cls.from_ranks({bytes(t): r for t, r in trainer.get_mergeable_ranks()})
        if tok.vocab_size < vocab_size:
            log.warning(
                f"tokenizer.vocab_size={vocab_size:,} asks for more merges than the training "
                f"text holds: the vocabulary came out as {tok.vocab_size:,} tokens (the model "
                "is sized to it)"
            )
        return tok

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int]) -> BPETokenizer:
        """From token bytes -> rank (id), in learned order; ``<|endoftext|>`` comes last."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        symbols = byte_symbols()

        def text(b: bytes) -> str:
            return "".join(symbols[x] for x in b)

        vocab = {text(t): r for t, r in ranks.items()}
        merges = [(text(a), text(b)) for a, b in merge_pairs(ranks)]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOT])
        return cls(tok, fast=True)

    @classmethod
    def from_hf_json(cls, json_str: str, fast: bool = False) -> BPETokenizer:
        """From a ``tokenizers`` JSON string (e.g. the contents of GPT-2's tokenizer.json)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(json_str), fast=fast)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise UserError(
                f"the BPE tokenizer JSON cannot be read ({str(e).splitlines()[0]}): pass the "
                "contents of a Hugging Face tokenizers tokenizer.json"
            ) from None

    def to_hf_json(self) -> str:
        return self._tok.to_str()

    @cached_property
    def _tiktoken(self):
        import tiktoken

        back = {s: b for b, s in enumerate(byte_symbols())}
        vocab = self._tok.get_vocab(with_added_tokens=False)
        ranks = {bytes(back[c] for c in token): i for token, i in vocab.items()}
        special = {EOT: self.eot_id} if self.eot_id is not None else {}
        return tiktoken.Encoding(
            "nanoforge-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        """The id of ``<|endoftext|>`` (GPT-2's 50256), or None when the vocabulary lacks it."""
        return self._tok.token_to_id(EOT)

    def unknown_chars(self, text: str) -> list[str]:
        """Byte-level: every character encodes."""
        return []

    def encode(self, text: str) -> np.ndarray:
        """Text -> array of token ids (int64); ``<|endoftext|>`` in the text is plain text."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        try:
            if self.fast:
                ids = self._tiktoken.encode_ordinary(text)
            else:
                ids = self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # a foreign (not byte-level) vocabulary that cannot spell it
            raise UserError(
                f"the text cannot be written in this tokenizer's vocabulary ({e}): use text "
                "the model's tokenizer can encode"
            ) from None
        return np.asarray(ids, dtype=np.int64)

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """Many texts at once, on ``threads`` threads (the Rust side releases the GIL)."""
        if self.fast:
            ids = self._tiktoken.encode_ordinary_batch(texts, num_threads=max(1, threads))
            return [np.asarray(i, dtype=np.int64) for i in ids]
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each token (for bits per byte). In a byte-level vocabulary each
        character of a token's string stands for one byte; ``<|endoftext|>`` and other added
        tokens stand for no text: 0 bytes, so bits per byte stays exact."""
        alphabet = set(byte_symbols())
        added = set(self._tok.get_added_tokens_decoder())
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                continue
            if set(token) <= alphabet:
                out[i] = len(token)
            else:  # a foreign vocabulary
                out[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids -> text (a cut inside a multi-byte character shows as U+FFFD)."""
        if self.fast:
            return self._tiktoken.decode([int(i) for i in ids])
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def state_dict(self) -> dict:
        state = {"kind": "bpe", "tokenizer_json": self.to_hf_json()}
        return {**state, "encoder": "tiktoken"} if self.fast else state

    @classmethod
    def from_state_dict(cls, state: dict) -> BPETokenizer:
        if state.get("kind") != "bpe" or not isinstance(state.get("tokenizer_json"), str):
            raise UserError("the checkpoint's tokenizer is not a nanoforge BPETokenizer")
        return cls.from_hf_json(state["tokenizer_json"], fast=state.get("encoder") == "tiktoken")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BPETokenizer):
            return False
        return json.loads(self.to_hf_json()) == json.loads(other.to_hf_json())

    def __hash__(self) -> int:
        return hash(self.to_hf_json())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


TOKENIZER_KINDS = ("char", "bpe")


def boundary_token(tokenizer) -> int:
    """The token that marks where a text begins or ends: ``<|endoftext|>`` where the
    vocabulary has it (GPT-2's, and every BPE learned here), else the newline (a character
    vocabulary reserves no special token), else id 0. lm-evaluation-harness puts it before a
    text scored with no context; an export declares it as BOS/EOS so both score alike."""
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None:
        return int(eot)
    try:
        ids = tokenizer.encode("\n")
    except UserError:  # a character vocabulary without a newline
        return 0
    return int(ids[0]) if len(ids) == 1 else 0


def tokenizer_from_state(state: dict) -> CharTokenizer | BPETokenizer:
    """The tokenizer a checkpoint carries (its ``state_dict()``), of whichever kind."""
    if not isinstance(state, dict):
        raise UserError(
            "the checkpoint's tokenizer is not a plain dict: not a nanoforge checkpoint"
        )
    kind = state.get("kind", state.get("type"))  # "type": char checkpoints before BPE
    if kind == "char":
        return CharTokenizer.from_state_dict(state)
    if kind == "bpe":
        return BPETokenizer.from_state_dict(state)
    raise UserError(
        f"the checkpoint's tokenizer is of unknown kind {kind!r} (known: "
        f"{', '.join(TOKENIZER_KINDS)}); it was not saved by this version of nanoforge"
    )


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer states encode identically (old and new char states compare)."""
    return tokenizer_from_state(a) == tokenizer_from_state(b)

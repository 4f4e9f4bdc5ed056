"""Step 1 of building a GPT (the README's table): turn text into integers and back.

Two tokenizers behind one interface (``encode(text) -> np.ndarray``, ``decode(ids) -> str``,
``vocab_size``, ``unknown_chars(text)``, ``state_dict()`` -> a plain dict):

- :class:`CharTokenizer` (``tokenizer=char``, the default): the vocabulary is the *sorted* set
  of characters of the corpus, so it is identical in every process and on every machine (a
  plain ``set`` iterates in an order that changes with string hashing). Encoding is one
  vectorised NumPy pass over the text, not a Python loop over its characters.
- :class:`BPETokenizer` (``tokenizer=bpe``): a byte-level BPE, trained and run by Hugging
  Face ``tokenizers`` (Rust, multi-threaded). Byte-level means any UTF-8 text encodes, with
  no unknown token; the JSON it saves is the ``tokenizers`` format, GPT-2's own
  ``tokenizer.json`` included. The few lines that show what it does are in
  :mod:`nanoforge.bpe` (a plain-Python trainer, for reading).

A tokenizer travels inside checkpoints as the plain dict of ``state_dict()`` (so checkpoints
load with ``torch.load(weights_only=True)``); :func:`tokenizer_from_state` turns it back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from nanoforge.errors import UserError


class Tokenizer(Protocol):
    """What the rest of nanoforge needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

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


class BPETokenizer:
    """A byte-level BPE (GPT-2's scheme) run by Hugging Face ``tokenizers``.

    Text is split by GPT-2's pre-tokenizer regex, each piece's UTF-8 bytes are mapped to 256
    printable symbols, and learned merges join frequent neighbours. Every byte is in the
    vocabulary, so no text is unknown. ``to_hf_json()`` / ``from_hf_json()`` read and write the
    ``tokenizers`` JSON format (GPT-2's ``tokenizer.json`` loads through ``from_hf_json``).
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``texts`` (pass the *training split only*) up to ``vocab_size``
        tokens (256 byte tokens + ``vocab_size - 256`` merges)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        vocab_size = int(vocab_size)
        if vocab_size < 257:
            raise UserError(
                f"tokenizer.vocab_size={vocab_size} is too small for a byte-level BPE: it needs "
                "the 256 byte tokens plus at least one merge. Use e.g. tokenizer.vocab_size=4096."
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_hf_json(cls, json_str: str) -> BPETokenizer:
        """From a ``tokenizers`` JSON string (e.g. the contents of GPT-2's tokenizer.json)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(json_str))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise UserError(
                f"the BPE tokenizer JSON cannot be read ({str(e).splitlines()[0]}): pass the "
                "contents of a Hugging Face tokenizers tokenizer.json"
            ) from None

    def to_hf_json(self) -> str:
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def unknown_chars(self, text: str) -> list[str]:
        """Byte-level: every character encodes."""
        return []

    def encode(self, text: str) -> np.ndarray:
        """Text -> array of token ids (int64)."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # a foreign (not byte-level) vocabulary that cannot spell it
            raise UserError(
                f"the text cannot be written in this tokenizer's vocabulary ({e}): use text "
                "the model's tokenizer can encode"
            ) from None
        return np.asarray(ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once, in parallel threads (the Rust side releases the GIL)."""
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each token (for bits per byte). In a byte-level vocabulary each
        character of a token's string stands for one byte."""
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if set(token) <= alphabet:
                out[i] = len(token)
            else:  # an added token (e.g. <|endoftext|>) or a foreign vocabulary
                out[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids -> text (a cut inside a multi-byte character shows as U+FFFD)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def state_dict(self) -> dict:
        return {"kind": "bpe", "tokenizer_json": self.to_hf_json()}

    @classmethod
    def from_state_dict(cls, state: dict) -> BPETokenizer:
        if state.get("kind") != "bpe" or not isinstance(state.get("tokenizer_json"), str):
            raise UserError("the checkpoint's tokenizer is not a nanoforge BPETokenizer")
        return cls.from_hf_json(state["tokenizer_json"])

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
    vocabulary has it (GPT-2's), else the newline (character and nanoforge's BPE vocabularies
    reserve no special token), else id 0. lm-evaluation-harness puts it before a text scored
    with no context; an export declares it as BOS/EOS so both score alike."""
    for text in ("<|endoftext|>", "\n"):
        try:
            ids = tokenizer.encode(text)
        except UserError:  # a character vocabulary without that character
            continue
        if len(ids) == 1:
            return int(ids[0])
    return 0


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

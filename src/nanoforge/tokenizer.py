"""Step 1 of building a GPT (the README's table): turn text into integers and back.

A character tokenizer: the vocabulary is the *sorted* set of characters of the corpus, so it is
identical in every process and on every machine (a plain ``set`` iterates in an order that
changes with string hashing). Encoding is one vectorised NumPy pass over the text, not a
Python loop over its characters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from nanoforge.errors import UserError


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in that vocabulary."""

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

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids -> text."""
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    # --- serialisation: a plain dict, so checkpoints load with torch.load(weights_only=True)
    def state_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_state_dict(cls, state: dict) -> CharTokenizer:
        if state.get("type") != "char" or not isinstance(state.get("chars"), str):
            raise UserError("the checkpoint's tokenizer is not a nanoforge CharTokenizer")
        return cls(list(state["chars"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash("".join(self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

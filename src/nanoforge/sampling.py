"""Step 6 of building a GPT (the README's table): choose the next token from the logits.

``temperature`` flattens (>1) or sharpens (<1) the distribution; 0 means greedy. ``top_k``
keeps exactly the k most likely tokens (ties broken by index, never more than k); ``top_p``
(nucleus) keeps the smallest set of most likely tokens whose probability reaches p.
"""

from __future__ import annotations

import math

import torch

from nanoforge.errors import UserError


def check_sampling_args(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise UserError(f"max_new_tokens must be a whole number of tokens, got {max_new_tokens!r}")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise UserError(f"top_k must be a whole number >= 1 (or null), got {top_k!r}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (or null to disable), got {top_k}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise UserError(f"top_p must be in (0, 1] (or null to disable), got {top_p}")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but exactly ``k`` largest logits per row to -inf."""
    if k >= logits.size(-1):
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability is >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
    drop_sorted = before >= p  # the first token always stays (before = 0 < p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, vocab) -> (B,) token ids. Non-finite logits are an error, not text: NaN
    weights would otherwise decode greedily to a token (argmax of NaN) and print nonsense."""
    if not bool(torch.isfinite(logits).all()):
        raise UserError(
            "the model's logits are not finite (NaN or inf): its weights are broken (a "
            "diverged or corrupt checkpoint). Sample from an earlier checkpoint."
        )
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if not bool(torch.isfinite(logits).all()):
        raise UserError(
            f"temperature={temperature} is so small that the logits overflow: use "
            "temperature=0 for greedy decoding, or a temperature of 0.01 or more"
        )
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

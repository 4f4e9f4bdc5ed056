"""nanoforge checkpoints inside EleutherAI's lm-evaluation-harness.

``NanoforgeLM`` is the harness's ``LM`` interface over our GPT (registered as the model type
``nanoforge``, so ``lm_eval --model nanoforge --model_args ckpt=RUN`` works once this module is
imported; ``python src/eval.py ckpt=RUN tasks=...`` imports it for you):

- ``loglikelihood``: the harness splits each (context, continuation) pair into tokens
  (``TemplateLM``); we score them in batches sorted by length, each row the last
  ``block_size + 1`` tokens of context + continuation (truncated from the left, as the
  harness's ``hf`` backend does), one forward pass per batch. The LM head, the largest matrix,
  runs only on the continuation's positions (``GPT.trunk`` gives the hidden states).
- ``loglikelihood_rolling``: a text's total log-likelihood over disjoint windows of the
  context (the harness's windowing), for perplexity tasks.
- ``generate_until``: our KV-cached sampler, stopped at the first stop string.

A text with no context is scored after the *prefix token*: ``<|endoftext|>`` where the
vocabulary has it, else the newline (character and our BPE vocabularies have no special
tokens); ``export.py`` declares the same token as BOS/EOS, so the ``hf`` backend on an export
scores identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoforge.errors import UserError
from nanoforge.tokenizer import boundary_token

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # pragma: no cover - the message is the point
    raise UserError(
        'evaluating on harness tasks needs lm-evaluation-harness: pip install -e ".[eval]"'
    ) from None


@register_model("nanoforge")
class NanoforgeLM(TemplateLM):
    """The harness's language-model interface over a nanoforge GPT and its tokenizer."""

    def __init__(
        self,
        ckpt: str | None = None,
        model=None,
        tokenizer=None,
        batch_size: int | str = 16,
        device: str | None = "auto",
        dtype: str = "float32",
        max_gen_toks: int = 256,
        **_ignored,
    ) -> None:
        super().__init__()
        from nanoforge.inference import pick_device

        self._device = pick_device(device or "auto")
        if model is None:
            from nanoforge.checkpoint import load_model

            if not ckpt:
                raise UserError("the nanoforge model needs a checkpoint: --model_args ckpt=RUN")
            model, tokenizer, _ = load_model(ckpt, self._device)
        if dtype != "float32":
            model = model.to(getattr(torch, dtype))
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise UserError(f"batch_size={batch_size!r}: nanoforge takes a whole number")
        self.batch_size = int(batch_size)
        self.block_size = model.config.block_size
        self.max_gen_toks = int(max_gen_toks)
        self._prefix = boundary_token(tokenizer)

    # --- what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self._prefix

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"nanoforge-{self.tok.kind}"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return [int(i) for i in self.tok.encode(string)]

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # --- scoring
    @torch.no_grad()
    def _score_rows(self, rows: list[tuple[list[int], int]]):
        """rows: (input tokens, number of continuation tokens at their end, the last input
        token excluded) -> per row (sum of log-probabilities, all greedy)."""
        inputs = [r[0] for r in rows]
        width = max(len(x) for x in inputs) - 1
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, x in enumerate(inputs):
            batch[i, : len(x) - 1] = torch.as_tensor(x[:-1])
        hidden = self.model.trunk(batch.to(self._device))
        # the positions whose next token is a continuation token, row by row
        pick_rows, pick_cols, targets = [], [], []
        for i, (x, n_cont) in enumerate(rows):
            start = len(x) - 1 - n_cont
            pick_rows += [i] * n_cont
            pick_cols += range(start, len(x) - 1)
            targets += x[len(x) - n_cont :]
        selected = hidden[torch.tensor(pick_rows), torch.tensor(pick_cols)]
        logprobs = F.log_softmax(self.model.lm_head(selected).float(), dim=-1)
        targets_t = torch.tensor(targets, device=logprobs.device)
        token_lp = logprobs.gather(-1, targets_t[:, None]).squeeze(-1)
        greedy = logprobs.argmax(-1) == targets_t
        out, at = [], 0
        for _, n_cont in rows:
            out.append(
                (float(token_lp[at : at + n_cont].sum()), bool(greedy[at : at + n_cont].all()))
            )
            at += n_cont
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise UserError("a harness request has an empty continuation: nothing to score")
            if len(continuation) > self.block_size:
                raise UserError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's "
                    f"context ({self.block_size} tokens)"
                )
            window = (list(context) + list(continuation))[-(self.block_size + 1) :]
            rows.append((window, len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            for i, r in zip(chunk, self._score_rows([rows[i] for i in chunk]), strict=True):
                results[i] = r
        for (key, _, _), r in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for context, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self._prefix,
                    max_seq_len=self.block_size,
                    context_len=1,
                ),
            ):
                windows.append((None, context, pred))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            text = self._generate(context, until, max_new, temperature if sample else 0.0)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out

    @torch.no_grad()
    def _generate(self, context: str, until: list[str], max_new: int, temperature: float) -> str:
        ids = self.tok_encode(context) or [self._prefix]
        idx = torch.tensor([ids[-self.block_size :]], device=self._device)
        g = torch.Generator(device=self._device).manual_seed(1234)
        new: list[int] = []
        text = ""
        for nxt in self.model.generate(idx, max_new, temperature, generator=g):
            new.append(int(nxt[0]))
            text = self.tok.decode(new)
            hits = [text.find(s) for s in until if s and s in text]
            if hits:
                return text[: min(hits)]
        return text

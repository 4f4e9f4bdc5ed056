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

A text with no context is scored after the *boundary token*
(``nanoforge.tokenizer.boundary_token``): ``<|endoftext|>`` where the vocabulary has it
(GPT-2's, every BPE learned here), else the newline (a character vocabulary has no special
token); ``export.py`` declares the same token as BOS/EOS, so the ``hf`` backend on an export
scores identically.
"""

from __future__ import annotations

import contextlib
import functools
import sys

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
        quiet: bool = False,
        **_ignored,
    ) -> None:
        super().__init__()
        self.quiet = quiet  # no progress bars (scores during training)
        from nanoforge.machine import pick_device

        self._device = pick_device(device or "auto")
        if model is None:
            from nanoforge.checkpoint import load_model

            if not ckpt:
                raise UserError("the nanoforge model needs a checkpoint: --model_args ckpt=RUN")
            model, tokenizer, _ = load_model(ckpt, self._device)
        from nanoforge.inference import check_decode_dtype

        check_decode_dtype(dtype, self._device)  # float32, bfloat16, int8 (CPU)
        if dtype == "int8":  # weight-only int8 Linears, bfloat16 activations (nanoforge.int8)
            from nanoforge.int8 import quantize_int8_

            model = quantize_int8_(model)
        elif dtype != "float32":
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
        unknown = self.tok.unknown_chars(string)
        if unknown:  # a character vocabulary cannot spell the task's text
            shown = ", ".join(map(repr, unknown[:10]))
            raise UserError(
                f"the task's text has character(s) this character-level model never saw: "
                f"{shown}. Score it with a model that can spell it (tokenizer=bpe, or a corpus "
                "with these characters)"
            )
        return [int(i) for i in self.tok.encode(string)]

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # --- scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

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


# --------------------------------------------------------------------------- quiet scoring
@contextlib.contextmanager
def quiet(bars: bool = False):
    """The harness scoring without writing to the console (the training callback's scores go
    to the loggers): no progress bars (the harness's request building, ``datasets``' split
    generation; ``bars=True`` keeps them, for eval.py) and no git subprocess, whose ``fatal:
    not a git repository`` reaches the terminal whenever the current folder is not a git
    checkout (the harness records a commit hash in results we do not keep)."""
    from unittest import mock

    import datasets
    import lm_eval.api.task
    import lm_eval.evaluator
    from tqdm import tqdm

    enabled = datasets.is_progress_bar_enabled()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", str))
        if not bars:
            stack.enter_context(
                mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True))
            )
            datasets.disable_progress_bars()
            if enabled:
                stack.callback(datasets.enable_progress_bars)
        yield


# --------------------------------------------------------------------------- eval.py tasks=
def task_names(tasks) -> list[str]:
    """``tasks=a,b`` (a string) or ``tasks=[a,b]`` (a list) -> ["a", "b"]."""
    names = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UserError("tasks= names no task: e.g. tasks=hellaswag,lambada_openai")
    return names


def task_manager(names: list[str], tasks_path: str | None):
    """The harness's TaskManager that knows ``names``; one line naming the closest known
    tasks for a name it does not know. The harness's own task catalogue (thousands of YAML
    files, seconds to index) is read only when ``tasks_path`` does not hold them all."""
    import difflib
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    if tasks_path:
        folder = Path(tasks_path).expanduser()
        if not folder.is_dir() or not any(folder.rglob("*.yaml")):
            raise UserError(
                f"tasks_path={str(folder)!r} holds no task YAML files: pass a folder of "
                "lm-evaluation-harness task configs (*.yaml)"
            )
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        if set(names) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=str(Path(tasks_path).expanduser()) if tasks_path else None)
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "see: lm_eval ls tasks"
            raise UserError(f"unknown harness task {name!r} ({hint})")
    return manager


def evaluate_tasks(cfg, out=sys.stdout) -> dict:
    """``eval.py ckpt=RUN tasks=...``: the harness's tasks on a checkpoint; a table on the
    console and the harness's metrics under ``tasks`` in eval.json."""
    import json
    import os

    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    from nanoforge.checkpoint import eval_json_path, resolve_checkpoint
    from nanoforge.io import atomic_write_bytes, read_json
    from nanoforge.threads import apply

    apply(cfg.get("threads"))
    names = task_names(cfg.tasks)
    limit = cfg.get("limit")
    if limit is not None and not (isinstance(limit, int | float) and limit > 0):
        raise UserError(f"limit must be a number of examples > 0 (or a fraction), got {limit!r}")
    manager = task_manager(names, cfg.get("tasks_path"))
    ckpt_path = resolve_checkpoint(cfg.ckpt)
    lm = NanoforgeLM(
        ckpt=str(ckpt_path),
        batch_size=int(cfg.batch_size),
        device=str(cfg.get("device", "auto")),
        dtype=str(cfg.get("dtype") or "float32"),
    )
    seed = cfg.get("seed")
    seeds = {} if seed is None else {"random_seed": int(seed), "numpy_random_seed": int(seed)}
    with quiet(bars=True):  # the bars stay; git's complaint outside a checkout goes
        results = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=cfg.get("num_fewshot"),
            limit=limit,
            log_samples=bool(cfg.get("log_samples", False)),
            bootstrap_iters=int(cfg.get("bootstrap_iters", 100000)),
            task_manager=manager,
            **seeds,
        )
    out.write(make_table(results) + "\n")
    target = eval_json_path(cfg, ckpt_path)
    record = read_json(target)
    record = record if isinstance(record, dict) else {}
    record["tasks"] = {
        **(record.get("tasks") if isinstance(record.get("tasks"), dict) else {}),
        **results["results"],
    }
    record.setdefault("checkpoint", str(ckpt_path.resolve()))
    if cfg.get("log_samples"):  # per example, in the harness's format, beside eval.json
        for task, samples in results.get("samples", {}).items():
            lines = "".join(json.dumps(s, default=str) + "\n" for s in samples)
            atomic_write_bytes(target.parent / f"samples_{task}.jsonl", lines.encode())
    atomic_write_bytes(target, (json.dumps(record, indent=2, default=str) + "\n").encode())
    out.write(f"wrote {target}{os.linesep}")
    return record["tasks"]


if __name__ == "__main__":  # the harness's own command line, with the nanoforge model known:
    # python -m nanoforge.harness run --model nanoforge --model_args ckpt=RUN --tasks hellaswag
    from lm_eval.__main__ import cli_evaluate

    if "run" in sys.argv[1:2] and not any(a.startswith("--device") for a in sys.argv):
        sys.argv += ["--device", "auto"]  # the harness's default is cuda:0, GPU or not
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

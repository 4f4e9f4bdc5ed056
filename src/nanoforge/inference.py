"""What generate.py, eval.py and export.py do: sample from a checkpoint, score it, export it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from nanoforge import threads
from nanoforge.checkpoint import eval_json_path, load_model, recorded_data, resolve_checkpoint
from nanoforge.corpora import corpus_outside
from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes, read_json
from nanoforge.machine import pick_device
from nanoforge.sampling import check_sampling_args

# the keys of `data=...` that choose which text is scored (eval.py data=text data.path=FILE)
DATA_SOURCE_KEYS = (
    "corpus",
    "path",
    "val_fraction",
    "cache_dir",
    "text_field",
    "max_chars",
    "name",
    "config",
    "split",
)


# --------------------------------------------------------------------------- generation
# generate.py's dtype=: the weights sampling runs with. int8 is weight-only: int8 Linear
# weights with bfloat16 activations (nanoforge.int8), on CPUs.
DECODE_DTYPES = ("float32", "bfloat16", "int8")


def check_decode_dtype(dtype: str, device: torch.device) -> None:
    if dtype not in DECODE_DTYPES:
        raise UserError(
            f"dtype={dtype!r} is not a sampling dtype: use {', '.join(DECODE_DTYPES[:-1])} "
            f"or {DECODE_DTYPES[-1]}"
        )
    if dtype == "int8" and device.type != "cpu":
        raise UserError(
            f"dtype=int8 runs PyTorch's int8 CPU kernel; on {device.type} use dtype=bfloat16 "
            "(or device=cpu)"
        )


def _prepare_for_sampling(model, dtype: str, device: torch.device):
    """Cast (or quantize) ``model`` for sampling in ``dtype`` on ``device``, in place
    (``dtype`` as :func:`check_decode_dtype` passed it, before the model was loaded)."""
    if dtype == "int8":
        from nanoforge.int8 import quantize_int8_

        return quantize_int8_(model)
    if device.type == "cpu":  # the weight layout MKL reads fastest (measured on CPUs only)
        return model.prepare_decoding(getattr(torch, dtype))
    return model.to(getattr(torch, dtype))


def generate(cfg: DictConfig, out=None) -> list[str]:
    """Sample ``num_samples`` continuations of ``prompt``; stream a single sample as it grows
    (to ``out``; None: the current sys.stdout, looked up at the call, not at import)."""
    out = sys.stdout if out is None else out
    check_sampling_args(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {cfg.num_samples}")
    dtype = str(cfg.get("dtype", "float32"))
    device = pick_device(cfg.device)
    check_decode_dtype(dtype, device)  # before loading anything
    model, tok, _ = load_model(cfg.ckpt, device)
    _prepare_for_sampling(model, dtype, device)
    prompt = str(cfg.prompt)
    if not prompt:
        raise UserError('prompt is empty: give at least one character, e.g. prompt="\\n"')
    unknown = tok.unknown_chars(prompt)
    if unknown:
        raise UserError(
            f"the prompt has character(s) the model never saw: {', '.join(map(repr, unknown))}. "
            f"The model knows: {''.join(tok.chars)!r}"
        )
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    idx = torch.as_tensor(tok.encode(prompt), device=device)[None].repeat(cfg.num_samples, 1)
    with threads.decoding(model.config.n_embd, device, rows=cfg.num_samples):
        return _sample(model, tok, prompt, idx, g, cfg, out)


def _sample(model, tok, prompt: str, idx, g, cfg: DictConfig, out) -> list[str]:
    steps = model.generate(
        idx,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        generator=g,
        use_cache=cfg.use_cache,
    )
    # <|endoftext|> ends a document: sampling stops there (stop_at_eot=false goes on)
    eot = tok.eot_id if cfg.get("stop_at_eot", True) else None
    if cfg.num_samples == 1:  # stream token by token
        out.write(prompt)
        pieces, pending = [], []
        for nxt in steps:
            if eot is not None and int(nxt[0]) == eot:
                break
            pending.extend(nxt.tolist())
            piece = tok.decode(pending)
            if piece.endswith("\ufffd"):  # a BPE token cut a UTF-8 character: wait for the rest
                continue
            pieces.append(piece)
            pending = []
            out.write(piece)
            out.flush()
        if pending:
            pieces.append(tok.decode(pending))
            out.write(pieces[-1])
        out.write("\n")
        return [prompt + "".join(pieces)]
    rows, done = [], torch.zeros(cfg.num_samples, dtype=torch.bool)
    for nxt in steps:
        rows.append(nxt)
        if eot is not None:
            done |= nxt.cpu() == eot
            if done.all():
                break
    ids = torch.stack(rows, dim=1).tolist()
    if eot is not None:
        ids = [row[: row.index(eot)] if eot in row else row for row in ids]
    texts = [prompt + tok.decode(row) for row in ids]
    for i, text in enumerate(texts):
        out.write(f"----- sample {i + 1}/{len(texts)} -----\n{text}\n")
    out.flush()
    return texts


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_ids(
    model, ids: torch.Tensor, batch_size: int = 32, token_bytes: torch.Tensor | None = None
) -> dict:
    """Mean next-token loss over every token of ``ids`` (but the first), each scored once.

    Non-overlapping windows of ``block_size`` inputs tile the sequence; the last window may be
    shorter. Deterministic: no sampling anywhere.
    """
    T = model.config.block_size
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise UserError("the evaluation split has fewer than 2 tokens: nothing to score")
    device = next(model.parameters()).device
    starts = list(range(0, n_targets, T))
    total, count = 0.0, 0
    full = [s for s in starts if s + T <= n_targets]
    for i in range(0, len(full), batch_size):
        chunk = torch.tensor(full[i : i + batch_size])
        offsets = torch.arange(T + 1)
        windows = ids[chunk[:, None] + offsets].to(device)
        logits, _ = model(windows[:, :-1])
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum"
        ).item()
        count += windows[:, 1:].numel()
    rest = [s for s in starts if s + T > n_targets]
    for s in rest:
        window = ids[s:].to(device)[None]
        logits, _ = model(window[:, :-1])
        total += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
        count += window.size(1) - 1
    loss = total / count
    result = {"loss": loss, "bpc": loss / math.log(2), "perplexity": math.exp(loss)}
    if token_bytes is not None:  # bits per UTF-8 byte of the scored text
        nbytes = int(token_bytes[ids[1:]].sum())
        result.update({"bpb": total / nbytes / math.log(2), "bytes": nbytes})
    return {**result, "tokens": count}


def evaluation_data(
    ckpt: dict,
    data_cfg: DictConfig | None,
    tokenizer,
    block_size: int,
    data_dir: str | Path = "data",
):
    """The training run's DataModule, rebuilt from what the checkpoint recorded, encoding with
    the checkpoint's tokenizer. ``data_cfg`` (``eval.py data=...``) swaps in another text: its
    corpus, path, val_fraction and cache_dir replace the recorded ones.

    A checkpoint may come from anyone: what it records is a hint, never an instruction. Its
    corpus path is read only inside this checkout's ``data_dir`` (another file needs the user's
    own ``data.path=``), and token files go to this checkout's ``data_dir/cache`` (or the
    user's ``data.cache_dir``), never to a folder the checkpoint names."""
    recorded = recorded_data(ckpt) or {}
    chosen = {k: data_cfg[k] for k in DATA_SOURCE_KEYS if data_cfg and k in data_cfg}
    if not recorded and not chosen:
        raise UserError(
            "the checkpoint does not say which corpus it was trained on: pass one, e.g. "
            "data=text data.path=FILE"
        )
    data_dir = Path(data_dir)
    path = recorded.get("path")
    if "path" not in chosen and path and corpus_outside(str(path), data_dir):
        corpus = recorded.get("corpus", "text")
        raise UserError(
            f"the checkpoint was trained on {path}, outside this checkout's data folder "
            f"({data_dir}): a recorded path is not followed there. If that file is yours, pass "
            f"it: data={corpus} data.path={path}"
        )
    args = {**recorded, **chosen, "block_size": block_size}
    args["cache_dir"] = chosen.get("cache_dir") or str(data_dir / "cache")
    from nanoforge.data import TextDataModule  # Lightning: only eval.py needs it, not generate.py

    return TextDataModule(**args, tokenizer=tokenizer)


def evaluate(cfg: DictConfig, out=None) -> dict:
    """Score a checkpoint on the whole validation split of its corpus (or of ``data=...``);
    the result line to ``out`` (None: the current sys.stdout). ``eval.py tasks=...`` runs
    ``nanoforge.harness.evaluate_tasks`` instead."""
    out = sys.stdout if out is None else out
    from nanoforge.threads import apply

    apply(cfg.get("threads"))
    device = pick_device(cfg.device)
    ckpt_path = resolve_checkpoint(cfg.ckpt)
    model, tok, ckpt = load_model(ckpt_path, device)
    data_dir = (cfg.get("paths") or {}).get("data_dir") or "data"
    data = evaluation_data(ckpt, cfg.get("data"), tok, model.config.block_size, data_dir)
    data.setup("validate")  # unseen characters: a clear UserError
    token_bytes = torch.from_numpy(tok.token_bytes())
    val = torch.from_numpy(np.asarray(data.val_ids, dtype=np.int64))
    result = evaluate_ids(model, val, cfg.batch_size, token_bytes)
    if tok.kind != "char":  # per token is not per character
        result.pop("bpc")
    result.update(
        {
            "checkpoint": str(ckpt_path.resolve()),
            "corpus": data.corpus,
            "path": data.path,
            "val_fraction": data.val_fraction,
            "step": ckpt.get("global_step"),
        }
    )
    out.write(
        f"val/loss={result['loss']:.4f} "
        + (f"val/bpc={result['bpc']:.4f} " if "bpc" in result else "")
        + f"val/bpb={result['bpb']:.4f} perplexity={result['perplexity']:.3f} "
        f"over {result['tokens']:,} tokens\n"
    )
    target = eval_json_path(cfg, ckpt_path)
    previous = read_json(target)  # keep the harness scores an earlier tasks= run wrote
    if isinstance(previous, dict) and isinstance(previous.get("tasks"), dict):
        result["tasks"] = previous["tasks"]
    atomic_write_bytes(target, (json.dumps(result, indent=2) + "\n").encode())
    out.write(f"wrote {target}\n")
    return result

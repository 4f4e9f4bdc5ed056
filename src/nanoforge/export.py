"""Export a checkpoint for Hugging Face ``transformers`` (what ``src/export.py`` runs): the
checkpoint's GPT as a GPT-2 directory, written by ``nanoforge.hf``."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from nanoforge.checkpoint import load_model
from nanoforge.errors import UserError


def export(cfg: DictConfig, out=sys.stdout) -> Path:
    """The checkpoint ``cfg.ckpt`` as a Hugging Face GPT-2 directory ``cfg.out``."""
    from nanoforge.hf import export_dir

    if not cfg.get("out"):
        raise UserError("no output directory given: pass out=DIR (e.g. out=exported)")
    model, tokenizer, _ = load_model(cfg.ckpt)
    path = export_dir(model, tokenizer, cfg.out, overwrite=bool(cfg.get("overwrite", False)))
    n = model.config.block_size
    out.write(
        f"exported to {path}: load it with transformers' AutoModelForCausalLM.from_pretrained"
        f"({str(path)!r}) and AutoTokenizer.from_pretrained({str(path)!r})\n"
        f"context: {n} tokens. transformers' generate() stops there by default "
        f"(generation_config.json); keep prompt + max_new_tokens <= {n}, as GPT-2's learned "
        "positions cannot slide (nanoforge's own sampler, generate.py, does)\n"
    )
    return path

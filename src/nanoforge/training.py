"""train(cfg): build everything from the composed config, fit, and report.

cfg.data    -> TextDataModule   (the tokenizer is built from the corpus here)
cfg.model   -> GPTConfig        (+ vocab_size from the tokenizer)
cfg.optim   -> OptimConfig      (AdamW + warmup/cosine schedule, in GPTModule)
cfg.trainer / callbacks / logger -> lightning.Trainer
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from omegaconf import DictConfig, OmegaConf

from nanoforge.callbacks import RunSummary
from nanoforge.errors import UserError
from nanoforge.module import GPTModule

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """A config group of named entries (callbacks, loggers) -> a list of objects."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def check_config(cfg: DictConfig) -> None:
    """Catch impossible settings before anything is built, with the key to change."""
    max_steps = cfg.trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise UserError(f"trainer.max_steps must be a positive integer, got {max_steps!r}")
    vci = cfg.trainer.get("val_check_interval")
    if isinstance(vci, int) and vci <= 0:
        raise UserError(f"trainer.val_check_interval must be > 0 steps, got {vci}")


def build(cfg: DictConfig):
    """Everything train() needs, built but not run (tests use this too)."""
    check_config(cfg)
    if cfg.get("seed") is not None:  # `is not None`: seed=0 is a seed too
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # builds the tokenizer: the model's vocab_size comes from it
    tok = datamodule.tokenizer
    model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": tok.vocab_size}
    module = GPTModule(
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tok.state_dict(),
        compile=bool(cfg.get("compile", False)),
    )
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # one switch turns the bar off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBarBase)]
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict:
    """Fit the model; return the run summary (what ``metrics.json`` holds)."""
    datamodule, module, trainer = build(cfg)
    n = module.model.num_params()
    log.info(
        f"GPT with {n / 1e6:.2f}M parameters, vocab {module.tokenizer.vocab_size}, "
        f"{len(datamodule.train_ids):,} train / {len(datamodule.val_ids):,} val tokens"
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
    return summary.summary(trainer, module) if summary else {}

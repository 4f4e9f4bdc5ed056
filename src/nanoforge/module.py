"""Steps 5 and 7: the training recipe around the GPT, as a LightningModule.

Lightning owns the loop (devices, precision, accumulation, clipping, checkpoints); this file
owns what is specific to language modelling: the loss, bits per character, which weights get
weight decay, and the learning-rate schedule (linear warmup, then cosine decay to ``min_lr``,
stepped once per optimizer step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch

from nanoforge.errors import UserError
from nanoforge.model import GPT, GPTConfig
from nanoforge.tokenizer import CharTokenizer

LN2 = math.log(2.0)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine length; None = trainer.max_steps
    fused: bool | None = None  # fused AdamW kernel; None = use it where PyTorch has one

    def __post_init__(self):
        if not self.lr > 0:
            raise UserError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from lr/(warmup+1) to lr over ``warmup_steps`` steps, then a half cosine
    from lr down to ``min_lr`` at ``decay_steps``, then ``min_lr`` for ever after.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>= 2-D: linear and embedding weights) only; biases and
    LayerNorm gains are not decayed. Tied parameters appear once."""
    params = dict(model.named_parameters())  # named_parameters() de-duplicates tied weights
    decay = [p for p in params.values() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params.values() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class GPTModule(L.LightningModule):
    """GPT + loss + optimizer + schedule. Checkpoints carry the model config and the tokenizer,
    so a checkpoint alone is enough to generate or evaluate."""

    def __init__(self, model: dict, optim: dict, tokenizer: dict, compile: bool = False):
        super().__init__()
        # plain dicts only: checkpoints then load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "model": dict(model),
                "optim": dict(optim),
                "tokenizer": dict(tokenizer),
                "compile": compile,
            }
        )
        self.config = GPTConfig.from_dict(dict(model))
        self.optim_config = OptimConfig(**dict(optim))
        self.tokenizer = CharTokenizer.from_state_dict(dict(tokenizer))
        if self.tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError("model.vocab_size must equal the tokenizer's vocab_size")
        self.model = GPT(self.config)
        self.compile = compile
        self._forward = self.model

    def configure_model(self) -> None:
        if self.compile and self._forward is self.model:
            self._forward = torch.compile(self.model)

    def forward(self, idx, targets=None):
        return self._forward(idx, targets)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        self.log("train/loss", loss, prog_bar=True)
        # the LR applied by this step's update (one tag, whatever the number of param groups)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/bpc", loss / LN2, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        # Lightning's reserved `step` key: validation scalars land at the number of optimizer
        # steps taken (20, 40, ...), the same x as the printed line, samples and metrics.json
        self.log("step", float(self.global_step))
        m = self.trainer.callback_metrics
        if "val/loss" in m:
            # one plain line per validation: readable in CI logs and by scripts
            line = (
                f"step {self.global_step}: val/loss={float(m['val/loss']):.4f} "
                f"val/bpc={float(m['val/bpc']):.4f}"
            )
            self.print(line)  # rank zero only, through the progress bar (no garbled lines)

    def configure_optimizers(self):
        o = self.optim_config
        fused = o.fused
        if fused is None:  # fused AdamW exists on CPU and CUDA in recent PyTorch
            fused = True
        opt = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=fused,
        )
        decay_steps = o.decay_steps or max(1, self.trainer.max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, o.lr, o.min_lr, o.warmup_steps, decay_steps) / o.lr
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

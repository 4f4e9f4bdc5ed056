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

from nanoforge.errors import NonFiniteLossError, UserError
from nanoforge.model import GPT, GPTConfig
from nanoforge.optim import MuonAdamW, MuonFP32, muon_params
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
    # "cosine": warmup, then half cosine to min_lr. "wsd": warmup, stable at lr, then a linear
    # cool-down to min_lr over the last cooldown_frac of decay_steps (warmup-stable-decay).
    schedule: str = "cosine"
    cooldown_frac: float = 0.2
    # "adamw", or "muon": torch.optim.Muon for the 2-D weights inside the blocks, AdamW (lr,
    # betas, weight_decay above) for embeddings, head, biases and norm gains.
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    # Newton-Schulz in float32 (MuonFP32); None = float32 except on CUDA, where
    # torch.optim.Muon's bfloat16 iterations are fast (see nanoforge/optim.py)
    muon_fp32: bool | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise UserError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in ("cosine", "wsd"):
            raise UserError(f"optim.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise UserError(f"optim.cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if self.optimizer not in ("adamw", "muon"):
            raise UserError(f"optim.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if not self.muon_lr > 0 or self.muon_weight_decay < 0:
            raise UserError("optim.muon_lr must be > 0 and optim.muon_weight_decay >= 0")


def lr_at(
    step: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
    schedule: str = "cosine",
    cooldown_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from lr/(warmup+1) to lr over ``warmup_steps`` steps, then down to
    ``min_lr`` at ``decay_steps`` and ``min_lr`` for ever after. "cosine" goes down along a
    half cosine; "wsd" stays at lr and decays linearly over the last ``cooldown_frac`` of
    ``decay_steps`` only.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    if schedule == "wsd":
        cooldown_start = max(warmup_steps, decay_steps - round(cooldown_frac * decay_steps))
        if step < cooldown_start:
            return lr
        progress = (step - cooldown_start) / max(1, decay_steps - cooldown_start)
        return lr - progress * (lr - min_lr)
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

    def __init__(
        self,
        model: dict,
        optim: dict,
        tokenizer: dict,
        compile: bool = False,
        data: dict | None = None,
        skip_nonfinite: bool = False,
    ):
        super().__init__()
        # plain dicts only: checkpoints then load with torch.load(weights_only=True).
        # `data` records the corpus and split, so eval.py can score the same validation text.
        self.save_hyperparameters(
            {
                "model": dict(model),
                "optim": dict(optim),
                "tokenizer": dict(tokenizer),
                "compile": compile,
                "data": dict(data or {}),
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
        # a NaN/inf loss stops training, unless skipping such batches was asked for
        self.skip_nonfinite = skip_nonfinite
        self.skipped_batches = 0

    def configure_model(self) -> None:
        if self.compile and self._forward is self.model:
            self._forward = torch.compile(self.model)

    def forward(self, idx, targets=None):
        return self._forward(idx, targets)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        if not torch.isfinite(loss):
            if not self.skip_nonfinite:
                raise NonFiniteLossError(
                    f"the training loss became {loss.item()} at step {self.global_step}; "
                    "training stopped and the last good checkpoint is kept. Lower optim.lr, "
                    "keep trainer.gradient_clip_val on, or set skip_nonfinite_loss=true to "
                    "skip such batches."
                )
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            return None  # no backward: the optimizer step that follows updates nothing
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

    # --- exact resume: the global RNG (dropout) travels in the checkpoint -----------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["nanoforge_rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # applied when training starts, after everything else that may draw random numbers
        self._rng_to_restore = checkpoint.get("nanoforge_rng")

    def on_train_start(self) -> None:
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._rng_to_restore = None

    def configure_optimizers(self):
        o = self.optim_config
        fused = o.fused
        if fused is None:  # fused AdamW exists on CPU and CUDA in recent PyTorch
            fused = True
        muon = muon_params(self.model) if o.optimizer == "muon" else []
        muon_ids = {id(p) for p in muon}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in muon_ids]}
            for g in param_groups(self.model, o.weight_decay)
        ]
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=fused,
        )
        if muon:
            fp32 = o.muon_fp32 if o.muon_fp32 is not None else self.device.type != "cuda"
            opt = MuonAdamW(
                opt,
                (MuonFP32 if fp32 else torch.optim.Muon)(
                    muon,
                    lr=o.muon_lr,
                    momentum=o.muon_momentum,
                    weight_decay=o.muon_weight_decay,
                ),
            )
        decay_steps = o.decay_steps or max(1, self.trainer.max_steps)
        # one multiplier for every group: Muon's LR follows the same warmup and decay shape
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                lr_at(s, o.lr, o.min_lr, o.warmup_steps, decay_steps, o.schedule, o.cooldown_frac)
                / o.lr
            ),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

"""The training recipe around the GPT, as a LightningModule (step 5 of the README's table:
the loss; step 7: training).

Lightning owns the loop (devices, precision, accumulation, clipping, checkpoints). This file
owns what is specific to language modelling: the next-token loss, bits per character and
per byte, exact
resume of the random state, and the hook that hands Lightning the optimizer and its per-step
schedule, which ``nanoforge.optim`` builds from ``cfg.optim``.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from nanoforge.errors import NonFiniteLossError, UserError
from nanoforge.model import GPT, GPTConfig
from nanoforge.optim import OptimConfig, configure_optimizer
from nanoforge.tokenizer import tokenizer_from_state

LN2 = math.log(2.0)


class GPTModule(L.LightningModule):
    """GPT + loss + metrics + the schedule hook. Checkpoints carry the model config and the
    tokenizer, so a checkpoint alone is enough to generate; the data it was trained on is
    recorded by the DataModule (``datamodule_hyper_parameters``), so eval.py can rebuild it."""

    def __init__(
        self,
        model: dict,
        optim: dict,
        tokenizer: dict,
        compile: bool = False,
        skip_nonfinite: bool = False,
    ):
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
        self.tokenizer = tokenizer_from_state(dict(tokenizer))
        if self.tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError("model.vocab_size must equal the tokenizer's vocab_size")
        self.model = GPT(self.config)
        self.compile = compile
        self._forward = self.model
        # a NaN/inf loss stops training, unless skipping such batches was asked for
        self.skip_nonfinite = skip_nonfinite
        self.skipped_batches = 0
        # UTF-8 bytes per token id: bits per byte compares runs whatever their tokenizer
        self.token_bytes = torch.from_numpy(self.tokenizer.token_bytes())
        self._val_sums = torch.zeros(2, dtype=torch.float64)  # nats, bytes

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
                    f"training stopped ({self._checkpoint_kept()}). Lower optim.lr, "
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

    def _checkpoint_kept(self) -> str:
        ckpt = self.trainer.checkpoint_callback
        saved = ckpt is not None and (ckpt.last_model_path or ckpt.best_model_path)
        if saved and Path(saved).is_file():
            return f"the last good checkpoint, {saved}, is kept"
        return "no checkpoint had been saved yet"

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if self.tokenizer.kind == "char":  # per token = per character
            self.log("val/bpc", loss / LN2, sync_dist=True)
        nbytes = self.token_bytes.to(y.device)[y].sum()
        self._val_sums += torch.stack([loss.detach().double() * y.numel(), nbytes.double()])

    def val_bpb(self) -> float:
        """Bits per UTF-8 byte of the validation batches seen since the epoch started (over
        every rank): ``val/loss * tokens / bytes / ln 2``."""
        sums = self.trainer.strategy.reduce(self._val_sums.clone(), reduce_op="sum")
        return float(sums[0] / sums[1] / LN2)

    def on_validation_epoch_end(self) -> None:
        bpb = self.val_bpb()
        self.log("val/bpb", bpb, sync_dist=False)  # reduced over ranks already
        if self.trainer.sanity_checking:
            return
        # Lightning's reserved `step` key: validation scalars land at the number of optimizer
        # steps taken (20, 40, ...), the same x as the printed line, samples and metrics.json
        self.log("step", float(self.global_step))
        m = self.trainer.callback_metrics
        if "val/loss" in m:
            # one plain line per validation: readable in CI logs and by scripts
            line = f"step {self.global_step}: val/loss={float(m['val/loss']):.4f} "
            if "val/bpc" in m:
                line += f"val/bpc={float(m['val/bpc']):.4f} "
            line += f"val/bpb={bpb:.4f}"
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
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        if mixed and self.optim_config.fused and self.trainer.gradient_clip_val:
            raise UserError(
                f"optim.fused=true cannot be combined with trainer.precision="
                f"{self.trainer.precision} and gradient clipping (fused AdamW unscales the "
                "gradients itself). Set optim.fused=null, or trainer.gradient_clip_val=0."
            )
        return configure_optimizer(
            self.model, self.optim_config, self.trainer.max_steps, self.device.type, mixed
        )

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
import time
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
        # one full-length sequence: Lightning's model summary (trainer.enable_model_summary=true)
        # counts the FLOPs of a forward pass on it
        self.example_input_array = torch.zeros(1, self.config.block_size, dtype=torch.long)
        self.compile = compile
        self._forward = self.model
        # a NaN/inf loss stops training, unless skipping such batches was asked for
        self.skip_nonfinite = skip_nonfinite
        self.skipped_batches = 0
        # the first non-finite loss (step, value), kept on the device: noting it costs no
        # host-device sync; it is read at the logging interval and before every checkpoint
        self._bad_step: torch.Tensor | None = None
        self._bad_value: torch.Tensor | None = None
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
        if self.skip_nonfinite:  # deciding to skip needs the value now: one sync per step
            if not torch.isfinite(loss):
                self.skipped_batches += 1
                self.log("train/skipped_batches", float(self.skipped_batches))
                return None  # no backward: the optimizer step that follows updates nothing
        else:
            self._note_nonfinite(loss)
            if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
                self.check_finite()
        self.log("train/loss", loss, prog_bar=True)
        # the LR applied by this step's update (one tag, whatever the number of param groups)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember the first non-finite loss, on the device (no sync)."""
        loss = loss.detach().float()
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, self.global_step, self._bad_step)
        self._bad_value = torch.where(first, loss, self._bad_value)

    def check_finite(self) -> None:
        """Stop with :class:`NonFiniteLossError` if a loss since the last check was NaN/inf.

        One host-device sync; called every ``trainer.log_every_n_steps`` steps, before every
        validation and before every checkpoint is written (so none holds weights trained on
        a NaN).
        Between two checks the weights may have taken a few NaN steps: the checkpoint on disk
        is from before them.
        """
        if self._bad_step is None or int(self._bad_step) < 0:
            return
        raise NonFiniteLossError(
            f"the training loss became {float(self._bad_value)} at step {int(self._bad_step)}; "
            f"training stopped ({self._checkpoint_kept()}). Lower optim.lr, "
            "keep trainer.gradient_clip_val on, or set skip_nonfinite_loss=true to "
            "skip such batches."
        )

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.check_finite()  # before validation: its checkpoint must hold good weights

    def on_train_end(self) -> None:
        self.check_finite()

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
        # the one line per validation is nanoforge.console.ProgressLog's (console and train.log)

    # --- exact resume: the global RNG (dropout) travels in the checkpoint -----------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # a checkpoint never holds weights trained on a NaN loss
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["nanoforge_rng"] = rng
        # the plan this state was trained under (hyper_parameters["optim"] + this length): a
        # resume that changes it can tell where the two plans part (nanoforge.extension)
        checkpoint["nanoforge_schedule"] = {
            "max_steps": int(self.trainer.max_steps),
            # when: what the loggers write after this moment comes after this state
            "saved_at": time.time(),
        }

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

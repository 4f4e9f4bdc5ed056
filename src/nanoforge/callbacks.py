"""Callbacks Lightning does not ship: text samples, token throughput and a run summary.

Checkpointing, the learning-rate monitor and the progress bar are Lightning's own
(``ModelCheckpoint``, ``LearningRateMonitor``, ``TQDMProgressBar``), configured in
``configs/callbacks/default.yaml``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes


class TextSamples(L.Callback):
    """At every validation: generate from a fixed prompt with a fixed seed, add the text to
    TensorBoard (tag ``samples``, indexed by step) and append it to ``samples.txt``.

    Sampling uses its own ``torch.Generator``, so it never disturbs the training RNG.
    """

    def __init__(
        self,
        output_dir: str,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 1234,
    ):
        self.output_dir = Path(output_dir)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed

    def on_fit_start(self, trainer, pl_module) -> None:
        unknown = pl_module.tokenizer.unknown_chars(self.prompt)
        if unknown or not self.prompt:
            raise UserError(
                f"callbacks.text_samples.prompt {self.prompt!r} has characters the corpus "
                f"lacks: {unknown}. Choose a prompt written with the corpus's characters."
            )

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.max_new_tokens <= 0:
            return
        text = self.sample(pl_module)
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # markdown code block keeps line breaks and spacing in TensorBoard's text tab
                logger.experiment.add_text("samples", f"```\n{text}\n```", global_step=step)
        if not trainer.fast_dev_run:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"===== step {step} =====\n{text}\n\n")

    def sample(self, pl_module) -> str:
        tok, model = pl_module.tokenizer, pl_module.model
        was_training = model.training
        model.eval()
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        idx = torch.as_tensor(tok.encode(self.prompt), device=pl_module.device)[None]
        ids = [
            int(t)
            for t in model.generate(
                idx, self.max_new_tokens, self.temperature, self.top_k, generator=g
            )
        ]
        model.train(was_training)
        return self.prompt + tok.decode(ids)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without the nested validation bar, whose cursor-up escapes
    garble the one-line ``step N: val/loss=...`` reports in logs and CI output."""

    def init_validation_tqdm(self):
        if self.trainer.state.fn == "validate":  # a validate-only run keeps its bar
            return super().init_validation_tqdm()
        return Tqdm(disable=True)


class TokenThroughput(L.Callback):
    """Logs ``throughput/tokens_per_sec``: training tokens (all ranks) per wall second,
    averaged over the steps since the last log, with validation time excluded."""

    def __init__(self):
        self.tokens = 0  # since fit start, all ranks
        self.train_seconds = 0.0
        self._t0: float | None = None
        self._window_tokens = 0
        self._window_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        n = batch[0].numel() * trainer.world_size
        self.tokens += n
        self.train_seconds += dt
        self._window_tokens += n
        self._window_seconds += dt
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and self._window_seconds:
            pl_module.log("throughput/tokens_per_sec", self._window_tokens / self._window_seconds)
            self._window_tokens, self._window_seconds = 0, 0.0

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    # counts survive a resume (Lightning stores callback state in the checkpoint)
    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))


class RunSummary(L.Callback):
    """Keeps the validation history and writes ``metrics.json`` when training ends: what
    sweep reports and benchmarks read instead of parsing logs."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.history: list[dict] = []
        self._start = time.perf_counter()
        self._earlier_seconds = 0.0  # wall time of the runs this one resumed

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "wall_seconds": self._earlier_seconds + time.perf_counter() - self._start,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self._earlier_seconds = float(state_dict.get("wall_seconds", 0.0))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" in m:
            self.history.append(
                {
                    "step": trainer.global_step,
                    "val/loss": float(m["val/loss"]),
                    **{k: float(m[k]) for k in ("val/bpc", "val/bpb") if k in m},
                }
            )

    def summary(self, trainer, pl_module, status: str = "finished", error: str = "") -> dict:
        """What ``metrics.json`` holds. ``status``: finished, stopped (SIGTERM / Ctrl-C) or
        failed (``error`` says why)."""
        thr = next((c for c in trainer.callbacks if isinstance(c, TokenThroughput)), None)
        best = min(self.history, key=lambda h: h["val/loss"]) if self.history else None
        last = self.history[-1] if self.history else None
        ckpt = trainer.checkpoint_callback
        return {
            "status": status,
            **({"error": error} if error else {}),
            "val/loss": last["val/loss"] if last else math.nan,
            "val/bpc": last.get("val/bpc", math.nan) if last else math.nan,
            "val/bpb": last.get("val/bpb", math.nan) if last else math.nan,
            "best/val/loss": best["val/loss"] if best else math.nan,
            "best/val/bpc": best.get("val/bpc", math.nan) if best else math.nan,
            "best/val/bpb": best.get("val/bpb", math.nan) if best else math.nan,
            "best/step": best["step"] if best else None,
            "best/checkpoint": (ckpt.best_model_path or None) if ckpt is not None else None,
            "steps": trainer.global_step,
            "tokens_seen": thr.tokens if thr else None,
            "num_params": pl_module.model.num_params(),
            "wall_seconds": self._earlier_seconds + time.perf_counter() - self._start,
            "train_tokens_per_sec": thr.tokens_per_sec if thr else None,
            "history": self.history,
        }

    def _write(self, trainer, pl_module, status: str, error: str = "") -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        data = json.dumps(self.summary(trainer, pl_module, status, error), indent=2) + "\n"
        atomic_write_bytes(self.output_dir / "metrics.json", data.encode())

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "finished")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, StopRequested):  # a graceful stop is a resumable end
            self._write(trainer, pl_module, "stopped")
        elif isinstance(exception, UserError):  # NaN loss, full disk: say so in the record
            self._write(trainer, pl_module, "failed", str(exception))


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to copy)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def end_of_run(summary: dict, run_dir: str | os.PathLike) -> str:
    """The lines a run ends with: how it ended, its losses, where it went, what to run next."""

    def fmt(key: str) -> str:
        value = summary.get(key)
        return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "—"

    run = _shown(run_dir)
    tokens = summary.get("train_tokens_per_sec") or 0
    lines = [
        f"run {summary['status']}: {summary['steps']:,} steps in "
        f"{_duration(summary['wall_seconds'])}, {tokens:,.0f} tokens/s",
        f"  val/loss {fmt('val/loss')}  val/bpc {fmt('val/bpc')}  val/bpb {fmt('val/bpb')}  "
        f"(best val/loss {fmt('best/val/loss')} at step {summary.get('best/step') or '—'})",
        f"  run dir   {run}",
    ]
    if summary.get("best/checkpoint"):
        lines.append(f"  best      {_shown(summary['best/checkpoint'])}")
    lines += [
        "next:",
        f'  python src/generate.py ckpt={run} prompt="ROMEO:"',
        f"  python src/eval.py ckpt={run}",
        f"  python src/train.py resume={run}"
        + (f" trainer.max_steps={2 * summary['steps']}" if summary["status"] == "finished" else ""),
        f"  tensorboard --logdir {run}",
    ]
    return "\n".join(lines)


class ValidateAtEnd(L.Callback):
    """Every run validates at its last step: a run whose ``trainer.max_steps`` is not a
    multiple of ``trainer.val_check_interval`` (or is below it) would otherwise end without a
    final val/loss, and fail in a sweep. At the last step it asks Lightning to stop, which
    makes Lightning validate once more before it does (``Trainer.should_stop``)."""

    def __init__(self):
        self.validated_at: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = 0 < trainer.max_steps <= trainer.global_step
        if last and self.validated_at != trainer.global_step and not trainer.fast_dev_run:
            trainer.should_stop = True


class StopRequested(Exception):
    """Raised by :class:`GracefulStop` to leave ``trainer.fit`` at once, with the training
    state saved; ``training.train`` turns it into the resume hint and exit code 143/130."""


class GracefulStop(L.Callback):
    """SIGTERM (what SLURM and `kill` send) or Ctrl-C: save ``checkpoints/last.ckpt`` and stop
    within one training step or one validation batch, with no validation on the way out.

    Lightning's own SIGTERM handling would, with our endless training stream, either wait for
    an epoch end that never comes or exit with code 0 from inside validation, and asking it to
    stop (``Trainer.should_stop``) runs one more validation first. So this callback installs
    its own handlers for the length of training and, on every rank at the same point:

    - during a training step: saves after the step, then leaves ``fit`` (:class:`StopRequested`);
    - during a validation: saves at the next validation batch the state training had before
      the validation began (weights and optimizer do not change during validation; only the
      loop counters do, and those are taken from before it), then leaves ``fit``.

    The loggers are flushed and ``metrics.json`` written on the way out. A second Ctrl-C
    interrupts at once.
    """

    EXIT_CODES: ClassVar[dict[str, int]] = {"SIGTERM": 143, "SIGINT": 130}

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.signal: str | None = None
        self.saved: Path | None = None
        self._previous: dict = {}
        self._loops_before_validation: dict | None = None
        self._saving_mid_validation = False

    def _handler(self, trainer):
        def handle(signum, frame):
            name = signal.Signals(signum).name
            if self.signal is not None and name == "SIGINT":
                raise KeyboardInterrupt  # second Ctrl-C: abort now
            if self.signal is None:
                self.signal = name
                print(f"\n{name}: saving and stopping", file=sys.stderr, flush=True)
                launcher = trainer.strategy.launcher  # forward to DDP child processes
                if launcher is not None and hasattr(launcher, "kill") and name == "SIGTERM":
                    launcher.kill(signum)

        return handle

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler(trainer))

    def _requested(self, trainer) -> bool:
        stop = self.signal is not None
        if trainer.world_size > 1:  # stop on every rank at the same point, or DDP deadlocks
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.signal = self.signal or "SIGTERM"
        return stop

    def _save_and_stop(self, trainer) -> None:
        ckpt_cb = trainer.checkpoint_callback
        folder = self.output_dir / "checkpoints"
        if ckpt_cb is not None and ckpt_cb.dirpath:
            folder = Path(ckpt_cb.dirpath)
        self.saved = folder / "last.ckpt"
        trainer.save_checkpoint(self.saved, weights_only=False)  # the full training state
        raise StopRequested(self.signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._requested(trainer):
            self._save_and_stop(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._loops_before_validation = copy.deepcopy(trainer.fit_loop.state_dict())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and self._loops_before_validation is not None and self._requested(trainer):
            self._saving_mid_validation = True
            self._save_and_stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._loops_before_validation = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._saving_mid_validation:  # resume where training was, not inside validation
            checkpoint["loops"]["fit_loop"] = self._loops_before_validation

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signal or "", 0)

    def resume_hint(self, step: int) -> str:
        return (
            f"{self.signal} received: stopped at step {step} and saved {self.saved}. "
            f"Resume with: python src/train.py resume={self.output_dir}"
        )

"""Callbacks Lightning does not ship: text samples, token throughput and a run summary.

Checkpointing is Lightning's ``ModelCheckpoint`` (best.ckpt, last.ckpt) with one more file,
the state where the cool-down begins (:class:`RunCheckpoint`); the progress bar is Lightning's
``TQDMProgressBar`` (``nanoforge.console``), configured in ``configs/callbacks/default.yaml``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nanoforge import threads
from nanoforge.errors import NonFiniteLossError, UserError
from nanoforge.extension import BEST_AT_COOLDOWN, COOLDOWN_CKPT, describe
from nanoforge.io import atomic_write_bytes
from nanoforge.optim import cooldown_start

log = logging.getLogger(__name__)


class TextSamples(L.Callback):
    """At every validation: generate from a fixed prompt with a fixed seed, append the text to
    ``samples.txt`` and hand it to each tracker the way it shows text: TensorBoard's Text tab
    (tag ``samples``, indexed by step); MLflow and W&B through their ``log_samples``
    (``nanoforge.loggers``: a text artifact per step, a Table of every sample so far).

    Sampling uses its own ``torch.Generator``, so it never disturbs the training RNG. The
    samples so far travel in the checkpoint, so a resumed run's W&B table keeps them all.
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
        self.samples: list[tuple[int, str]] = []  # (step, text), every validation so far

    def state_dict(self) -> dict:
        return {"samples": [[step, text] for step, text in self.samples]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples = [(int(step), str(text)) for step, text in state_dict.get("samples", [])]

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run writes on from its checkpoint's step: samples a killed process wrote
        # after it, or a set-aside cool-down's (nanoforge.extension), are not this run's
        if trainer.is_global_zero and not trainer.fast_dev_run:
            drop_samples_after(self.output_dir / "samples.txt", trainer.global_step)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.prompt == "\n" and pl_module.tokenizer.unknown_chars("\n"):
            # the default prompt, on a corpus with no line break: start from a token it has
            self.prompt = pl_module.tokenizer.decode([0])
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
        self.samples = [s for s in self.samples if s[0] < step] + [(step, text)]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # markdown code block keeps line breaks and spacing in TensorBoard's text tab
                logger.experiment.add_text("samples", f"```\n{text}\n```", global_step=step)
            elif hasattr(logger, "log_samples"):  # MLflow, W&B (nanoforge.loggers)
                logger.log_samples(self.samples)
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
        with threads.decoding(model.config.n_embd, pl_module.device):  # narrow: one thread
            ids = [
                int(t)
                for t in model.generate(
                    idx, self.max_new_tokens, self.temperature, self.top_k, generator=g
                )
            ]
        model.train(was_training)
        return self.prompt + tok.decode(ids)


_SAMPLE_HEADER = re.compile(r"^===== step (\d+) =====$", re.MULTILINE)


def drop_samples_after(path: Path, step: int) -> None:
    """Cut ``samples.txt`` before its first sample of a step after ``step`` (atomically;
    nothing to do when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return
    later = next((m for m in _SAMPLE_HEADER.finditer(text) if int(m.group(1)) > step), None)
    if later is not None:
        atomic_write_bytes(path, text[: later.start()].encode("utf-8"))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``best.ckpt``, ``last.ckpt`` at every validation), plus
    the training state at the step where a ``wsd`` run's cool-down begins:
    ``checkpoints/cooldown_start.ckpt``, and ``best.ckpt`` as it was then (a hard link,
    ``cooldown_start.best.ckpt``). A finished run extended to more steps continues from there,
    exactly as if it had been planned longer (``nanoforge.extension``).

    The state is saved at the end of that step (``on_train_batch_end``); when a validation
    follows at the same step, the state after it replaces that one, so a run continued from
    it neither repeats nor skips the validation. Written like every checkpoint (atomically,
    ``nanoforge.checkpoint_writer``); a checkpoint callback runs after the other callbacks, so
    their state is complete.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cooldown_saved_at: int | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        """A run directory moved or copied elsewhere and resumed there: its checkpoints moved
        with it, so the record of them moves too. Lightning keeps ``best_model_score`` only
        when ``dirpath`` is unchanged; without it the first validation after the resume
        replaced ``best.ckpt`` whatever its loss. A checkpoint from another run (its best
        file not in this folder) loads as Lightning loads it."""
        old = state_dict.get("dirpath")
        best = state_dict.get("best_model_path") or ""
        if old and self.dirpath and Path(old) != Path(self.dirpath) and best:
            moved = Path(self.dirpath) / Path(best).name
            if Path(best).parent == Path(old) and moved.is_file():

                def here(path):
                    return str(Path(self.dirpath) / Path(path).name) if path else path

                state_dict = {
                    **state_dict,
                    "dirpath": self.dirpath,
                    "best_model_path": here(best),
                    "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                    "last_model_path": here(state_dict.get("last_model_path")),
                    "best_k_models": {
                        here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()
                    },
                }
        super().load_state_dict(state_dict)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # once per step: with gradient accumulation, every micro-batch ends here
        if self._cooldown_saved_at != trainer.global_step:
            self._save_cooldown_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)  # best.ckpt and last.ckpt first
        if not trainer.sanity_checking:
            self._save_cooldown_start(trainer, pl_module)

    def _save_cooldown_start(self, trainer, pl_module) -> None:
        step = cooldown_start(pl_module.optim_config, trainer.max_steps)
        if step is None or trainer.global_step != step or not self.dirpath:
            return
        if trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        folder = Path(self.dirpath)
        # every rank: it gathers their state; the full state, said so (else Lightning logs that
        # weights_only defaulted to False, a line in the middle of the run's console)
        trainer.save_checkpoint(folder / COOLDOWN_CKPT, weights_only=False)
        self._cooldown_saved_at = step
        if trainer.is_global_zero:
            best = Path(self.best_model_path) if self.best_model_path else None
            keep_file(best, folder / BEST_AT_COOLDOWN)


def keep_file(source: Path | None, target: Path) -> None:
    """``target`` becomes what ``source`` is now, whatever later replaces ``source`` (our
    writers rename a new file over the old one): a hard link, else a copy; no ``source``
    removes ``target``."""
    if source is None or not source.is_file():
        target.unlink(missing_ok=True)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class TokenThroughput(L.Callback):
    """Logs how fast training runs and how well it uses the hardware, every
    ``trainer.log_every_n_steps`` steps (validation time excluded):

    - ``throughput/tokens_per_sec``: training tokens of all ranks per wall second;
    - ``throughput/mfu``: model FLOPs utilisation, ``tokens/s x FLOPs per token`` (6N + 12LdT,
      ``GPT.flops_per_token``) over the peak of all the devices: Lightning's peak-FLOPs
      table for the GPU and precision (``get_available_flops``), ``trainer.peak_flops=`` (per
      device) to override, and on a CPU, which has no table, the FLOP/s of a large float32
      matmul measured at start (logged as ``throughput/peak_flops``);
    - ``memory/peak_mb``: CUDA's max allocated memory, or the process's peak RSS on a CPU.

    The clock is read only at those steps (with one device sync on a GPU, where Lightning's
    own logging syncs anyway), so timing costs the step nothing.
    """

    def __init__(self, peak_flops: float | None = None):
        self.tokens = 0  # since fit start, all ranks
        self.train_seconds = 0.0
        self.peak_flops = peak_flops  # per device; None: from Lightning's table, or measured
        self.flops_per_token = 0
        self.world_size = 1
        self.mfu: float | None = None
        self._window_start: float | None = None
        self._window_tokens = 0
        self._pending_seconds = 0.0  # training time before a validation, not yet logged

    def on_fit_start(self, trainer, pl_module) -> None:
        self.flops_per_token = pl_module.model.flops_per_token()
        self.world_size = trainer.world_size
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(pl_module.device, str(trainer.precision))

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._window_start = self._now(pl_module.device)

    def _close_window(self, pl_module) -> float:
        seconds = 0.0
        if self._window_start is not None:
            seconds = self._now(pl_module.device) - self._window_start
            self.train_seconds += seconds
        self._window_start = None
        return seconds

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":  # the clock stops for validation
            self._pending_seconds += self._close_window(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = batch[0].numel() * trainer.world_size
        self.tokens += n
        self._window_tokens += n
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        seconds = self._close_window(pl_module) + self._pending_seconds
        self._pending_seconds = 0.0
        if seconds <= 0:
            return
        rate = self._window_tokens / seconds
        self._window_tokens = 0
        pl_module.log("throughput/tokens_per_sec", rate)
        if self.peak_flops:
            self.mfu = rate * self.flops_per_token / (self.peak_flops * self.world_size)
            pl_module.log("throughput/mfu", self.mfu)
            pl_module.log("throughput/peak_flops", float(self.peak_flops))
        pl_module.log("memory/peak_mb", peak_memory_mb(pl_module.device))

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    # counts survive a resume (Lightning stores callback state in the checkpoint)
    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))


_MEASURED_PEAK: dict[str, float] = {}


def device_peak_flops(device: torch.device, precision: str = "32-true") -> float | None:
    """Peak FLOP/s of one device: Lightning's table for GPUs; on a CPU, measured once per
    process as the best of a few 512x512 float32 matmuls on the threads torch uses (on this
    project's 2-core machine they reach ~200 GFLOP/s in ~25 ms; 1024x1024 ones spill the
    caches: half the rate, five times the time)."""
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(
            precision.split("-")[0], torch.float32
        )
        return get_available_flops(device, dtype)
    if device.type != "cpu":
        return None
    key = f"cpu/{torch.get_num_threads()}"
    if key not in _MEASURED_PEAK:
        n = 512
        g = torch.Generator().manual_seed(0)  # its own: the global RNG (dropout) stays as it was
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        best = math.inf
        for _ in range(8):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        _MEASURED_PEAK[key] = 2 * n**3 / best
    return _MEASURED_PEAK[key]


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's max allocated memory on a GPU; this process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


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
        # downstream task scores (nanoforge.downstream), when scored at this validation
        scored = {k: v for c in trainer.callbacks for k, v in getattr(c, "scored", {}).items()}
        if "val/loss" in m:
            self.history.append(
                {
                    "step": trainer.global_step,
                    "val/loss": float(m["val/loss"]),
                    **{k: float(m[k]) for k in ("val/bpc", "val/bpb") if k in m},
                    **scored,
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
            "mfu": thr.mfu if thr else None,
            "peak_flops": thr.peak_flops if thr else None,
            "peak_memory_mb": peak_memory_mb(pl_module.device),
            # what the end-of-run hint needs to extend the run as if planned longer
            "schedule": describe(pl_module.optim_config, trainer.max_steps),
            # the latest downstream task scores (nanoforge.downstream): what a sweep ranks by
            **{k: v for h in self.history for k, v in h.items() if k.startswith("eval/")},
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
        if isinstance(exception, SIGTERMException):  # a graceful stop is a resumable end
            self._write(trainer, pl_module, "stopped")
        elif isinstance(exception, UserError):  # NaN loss, full disk: say so in the record
            self._write(trainer, pl_module, "failed", str(exception))


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


class GracefulStop(L.Callback):
    """SIGTERM (what SLURM and `kill` send) or Ctrl-C: save ``checkpoints/last.ckpt`` and stop
    within one training step or one validation batch, with no validation on the way out.

    Lightning's own SIGTERM handling does the stopping: its handler sets
    ``trainer.received_sigterm``, its training loop checks it after every step (under DDP
    through the one-tensor broadcast it does each step anyway, so every rank stops at the same
    step) and its validation loop after every batch, raising ``SIGTERMException``. This
    callback adds only what a resumable stop needs:

    - Ctrl-C takes the same path (SIGINT sets the same flag; a second Ctrl-C aborts at once),
      instead of a KeyboardInterrupt in the middle of a step;
    - the save: on the way out (``on_exception``) every rank saves the full training state;
      stopped inside a validation, the checkpoint holds the loop state from before the
      validation began (weights and optimizer do not change during validation; only the loop
      counters do), so a resume repeats nothing and skips nothing;
    - the exit code (143 for SIGTERM, 130 for Ctrl-C) and the resume hint, which
      ``training.train`` prints after ``metrics.json`` is written.
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
            trainer._signal_connector.received_sigterm = True  # Lightning stops the loops

        return handle

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler(trainer))

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._loops_before_validation = copy.deepcopy(trainer.fit_loop.state_dict())

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
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        self.signal = self.signal or "SIGTERM"  # a DDP rank stopped by rank 0's broadcast
        folder = self.output_dir / "checkpoints"
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and ckpt_cb.dirpath:
            folder = Path(ckpt_cb.dirpath)
        self._saving_mid_validation = self._loops_before_validation is not None
        if trainer.is_global_zero:  # train.log too: the signal handler itself only prints
            log.warning(
                f"{self.signal}: saving {folder / 'last.ckpt'} at step {trainer.global_step}"
            )
        try:
            trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)
        except NonFiniteLossError as e:  # the weights took a NaN step: keep the last good file
            log.error(f"not saved: {e}")
            return
        self.saved = folder / "last.ckpt"

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signal or "", 0)

    def resume_hint(self, step: int) -> str:
        if self.saved is None:
            return f"{self.signal} received: stopped at step {step}; nothing was saved."
        return (
            f"{self.signal} received: stopped at step {step} and saved {self.saved}. "
            f"Resume with: python src/train.py resume={shlex.quote(str(self.output_dir))}"
        )

"""What a training run prints, and what its ``train.log`` holds.

The console of a default run is kept to what a person acts on, so the first step stays on a
laptop screen: the run directory, one line for the model and data, the progress bar, one line
per validation, and the end-of-run summary. ``train.log`` in the run directory gets the same
lines with timestamps, plus Lightning's own INFO lines, so someone tailing a cluster job sees
progress, the stop reason and the summary. The resolved config is saved in
``RUN/.hydra/config.yaml`` (``print_config=true`` prints it as a tree too).

- :class:`ConsoleHandler` writes log records above a live tqdm bar instead of through it.
- :func:`quiet_libraries` makes Lightning's INFO lines appear once (it installs a console
  handler of its own beside Hydra's), drops its "💡 Tip" adverts, and silences the one
  library deprecation warning that is not ours to fix.
- :class:`StepProgressBar` counts optimizer steps against ``trainer.max_steps``: the right
  total, ETA and speed on a resumed run too; off where the output is not a terminal (a log
  file would fill with carriage returns), where the per-validation lines carry the progress.
- :class:`ProgressLog` writes those lines, plain ``key=value`` for scripts and grep:
  ``step 500/2000: val/loss=1.9021 val/bpc=2.7441 train/loss=1.8876 (3.10 steps/s, ETA 8m04s)``.
- :func:`end_of_run` is the block a run ends with (durations as the ETA writes them,
  ``7m53s``), its ``generate`` hint prompting with the start of the run's own corpus.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import sys
import time
import warnings

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_only

from nanoforge.extension import extension_overrides
from nanoforge.io import shown

log = logging.getLogger("nanoforge")


class ConsoleHandler(logging.StreamHandler):
    """Messages as they are (no timestamp, no logger name: train.log keeps those), written
    with ``tqdm.write`` so a live progress bar is redrawn below the line rather than torn by
    it. Warnings and errors go to ``errors`` (stderr by default), prefixed ``warning:``."""

    def __init__(self, stream=None, errors=None):
        super().__init__(stream)
        self.errors = errors

    def _target(self, record: logging.LogRecord):
        if record.levelno < logging.WARNING:
            return self.stream
        return self.errors if self.errors is not None else sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            message = self.format(record)
            if record.name == "py.warnings":  # "path:line: Category: text\n  source line"
                first = message.splitlines()[0] if message else ""
                message = re.sub(r"^.*?:\d+: \w*Warning: ", "", first)
            if record.levelno >= logging.WARNING and not message.startswith(("warning", "error")):
                message = f"{record.levelname.lower()}: {message}"
            target = self._target(record)
            tqdm.write(message, file=target)
            target.flush()
        except Exception:
            self.handleError(record)


class _NoAdverts(logging.Filter):
    """Lightning's lines nobody acts on: its "💡 Tip" adverts, "TPU available: False" on a
    machine without one (the GPU line stays: it says which device trains), and its two lines
    about restoring a checkpoint (a resume is one line of ours: "resuming from ... at step N")."""

    DROPPED = (
        "💡 Tip",
        "TPU available: False",
        "Restoring states from the checkpoint path at ",
        "Restored all states from the checkpoint at ",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.DROPPED)


def quiet_libraries() -> None:
    """One line per library message, no adverts; call once the logging config is in place."""
    import lightning

    lightning_logger = logging.getLogger("lightning")
    console = getattr(lightning, "_console", None)  # its own stderr handler, beside Hydra's
    if console is not None and logging.getLogger().handlers:
        lightning_logger.removeHandler(console)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = True
        for handler in list(logging.getLogger(name).handlers):
            if type(handler) is logging.StreamHandler:
                logging.getLogger(name).removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        rank_zero = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in rank_zero.filters):
            rank_zero.addFilter(_NoAdverts())
    # Lightning 2.6 calls torch's deprecated `isinstance(x, LeafSpec)` (torch >= 2.9): theirs
    # to change, nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # a resumed run saves into its own checkpoints/ by design; nanoforge.rundir already
    # refuses a directory that holds another run's checkpoints
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning's hint on any machine with SLURM's tools installed, for a run it was not asked
    # to run under SLURM (hydra/launcher=slurm is how nanoforge submits)
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    # the warnings that remain reach train.log too, one line each (`warning: ...`)
    logging.captureWarnings(True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def end_of_run(
    summary: dict,
    run_dir: str | os.PathLike,
    prompt: str | None = None,
    next_steps: bool = True,
    eval_data: str = "",
) -> str:
    """The lines a run ends with: how it ended, its losses, where it went, what to run next
    (sampling with ``prompt``, the start of the run's own corpus: :func:`corpus_prompt`). A
    sweep's job leaves out what to run next: the sweep ends with one such block for all its
    jobs (``nanoforge.report.end_of_sweep``). ``eval_data``: the ``data=...`` overrides
    ``eval.py`` needs (a corpus outside the data folder is not followed from the checkpoint)."""

    def fmt(key: str) -> str:
        value = summary.get(key)
        return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "—"

    run = shown(run_dir)
    tokens = summary.get("train_tokens_per_sec") or 0
    losses = "  ".join(  # val/bpc only where a token is a character
        f"{k} {fmt(k)}" for k in ("val/loss", "val/bpc", "val/bpb") if k != "val/bpc" or
        fmt(k) != "—"
    )  # fmt: skip
    lines = [
        f"run {summary['status']}: {summary['steps']:,} steps in "
        f"{_duration(summary['wall_seconds'])}, {tokens:,.0f} tokens/s",
        f"  {losses}  "
        f"(best val/loss {fmt('best/val/loss')} at step {summary.get('best/step') or '—'})",
        f"  run dir   {run}",
    ]
    if summary.get("best/checkpoint"):
        lines.append(f"  best      {shown(summary['best/checkpoint'])}")
    if not next_steps:
        return "\n".join(lines)
    arg = shlex.quote(run)  # commands to paste: a path with a space stays one word
    lines += [
        "next:",
        f"  python src/generate.py ckpt={arg}"
        + (f" prompt={shlex.quote(prompt)}" if prompt else ""),
        f"  python src/eval.py ckpt={arg}" + (f" {eval_data}" if eval_data else ""),
        f"  python src/train.py resume={arg}"
        + (" " + " ".join(extend(summary)) if summary["status"] == "finished" else ""),
        f"  tensorboard --logdir {arg}",
    ]
    return "\n".join(lines)


def extend(summary: dict) -> list[str]:
    """The overrides after ``resume=RUN`` that extend a finished run to twice its steps, as
    if it had been planned that long (``nanoforge.extension.extension_overrides``)."""
    schedule = summary.get("schedule") or {"name": "wsd"}
    return extension_overrides(schedule, summary["steps"])


def corpus_prompt(text: str, limit: int = 30) -> str | None:
    """A prompt for the end-of-run ``generate`` hint from the start of the training text: its
    first non-blank line (``THESEUS:`` for the plays, ``import os`` for Python code), or that
    line's first word when the line is long. None when there is no usable text."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) > limit or ("'" in first and '"' in first):
        first = first.split()[0][:limit].strip("'\"") if first else ""
    return first or None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps of the whole run: ``750/2000`` on a run
    resumed at step 750, its speed and ETA from the steps this process ran (tqdm's
    ``initial``). No nested validation bar (its cursor-up escapes garble the lines above).
    Off when stdout is not a terminal: a log file would fill with carriage returns."""

    def __init__(self, refresh_rate: int = 10, leave: bool = True, tty_only: bool = True):
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        if tty_only and not sys.stdout.isatty():
            self.disable()

    def init_train_tqdm(self) -> Tqdm:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_start(self, trainer, *_) -> None:
        super().on_train_start(trainer)
        self._count_steps(trainer)

    def on_train_epoch_start(self, trainer, *_) -> None:
        """Nothing: one bar counts the steps of the whole run. (Lightning's own makes a new bar
        per epoch, which left the first one frozen at ``train: 0%`` above the validation
        lines.)"""

    def _count_steps(self, trainer) -> None:
        if self.is_disabled:
            return
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        bar.reset(total=total)
        step = trainer.global_step
        bar.initial = bar.n = bar.last_print_n = step  # the rate counts this process's steps
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.is_disabled:
            return
        step = trainer.global_step
        if step % self.refresh_rate == 0 or step == trainer.max_steps:
            bar = self.train_progress_bar
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.is_disabled:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def init_validation_tqdm(self) -> Tqdm:
        if self.trainer.state.fn == "validate":  # a validate-only run keeps its bar
            return super().init_validation_tqdm()
        return Tqdm(disable=True)


class ProgressLog(L.Callback):
    """One log line per validation (console and train.log): the step out of the total, the
    losses, this process's speed and the time left."""

    def __init__(self):
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._t0 is None:
            return
        step, total = trainer.global_step, trainer.max_steps
        m = trainer.callback_metrics
        head = f"step {step}/{total}:" if total and total > 0 else f"step {step}:"
        keys = ("val/loss", "val/bpc", "val/bpb", "train/loss")
        parts = [head, *(f"{k}={float(m[k]):.4f}" for k in keys if k in m)]
        elapsed, done = time.perf_counter() - self._t0, step - self._step0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            eta = f", ETA {_duration((total - step) / rate)}" if total and total > step else ""
            parts.append(f"({rate:.2f} steps/s{eta})")
        log.info(" ".join(parts))


def print_config_tree(cfg, order=("data", "model", "optim", "trainer")) -> None:
    """The resolved config as a rich tree, main groups first (``print_config=true``)."""
    import rich
    import rich.syntax
    import rich.tree
    from omegaconf import DictConfig, OmegaConf

    tree = rich.tree.Tree("config", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold cyan")
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text.rstrip() or "null", "yaml", theme="ansi_dark"))
    rich.print(tree)

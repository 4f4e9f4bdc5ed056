"""Resuming under another plan: a finished run extended exactly as if it had been planned longer.

A resumed run may come back with another ``trainer.max_steps`` (``resume=RUN
trainer.max_steps=4000`` after 2000 steps), or other ``optim.*`` settings, and with them another
learning-rate schedule. Resumed from its last checkpoint, a warmup-stable-decay run that has
finished its cool-down would have its schedule stretched: the learning rate climbs back from
``min_lr`` to the peak and val/loss rises. The schedule makes this avoidable: up to the step
where its cool-down begins, a run follows exactly what any run planned longer follows (warmup,
then the peak LR, the same batches, since the stream is indexed by the step). So every run
keeps the training state of that step (``checkpoints/cooldown_start.ckpt``, written by
:class:`nanoforge.callbacks.RunCheckpoint`), and :func:`plan` decides where a resume starts:

- from the checkpoint asked for, when the new plan gives every step up to it the learning rate
  it was trained with (a plain resume, or an extension before the cool-down began);
- else from ``cooldown_start.ckpt``, when the new plan agrees with it up to its step: the run
  then retraces, bit for bit, a run planned with the new settings from the start, and the
  part of the old cool-down after that step is set aside (:meth:`Continuation.apply`; its
  samples and TensorBoard events are dropped from the record, see ``docs/extending-runs.md``);
- else from the checkpoint asked for, with a warning that says how the learning rate jumps
  and how to avoid it (a ``cosine`` run decays from its warmup on: an extension re-warms it
  unless ``optim.decay_steps`` keeps the old length).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoforge.errors import UserError
from nanoforge.io import atomic_write
from nanoforge.optim import OptimConfig, first_difference, lr_factor, schedule_length

# beside last.ckpt and best.ckpt, in the run's checkpoints/
COOLDOWN_CKPT = "cooldown_start.ckpt"
# best.ckpt as it was when the cool-down began (a hard link: costs no space while the two
# are the same file); it becomes best.ckpt again when a run continues from COOLDOWN_CKPT
BEST_AT_COOLDOWN = "cooldown_start.best.ckpt"


def _read(path: Path) -> dict | None:
    """A checkpoint's small entries, memory-mapped (its tensors are not read), or None when
    it cannot be read (then ``check_resumable`` says what is wrong with it)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) else None


def _plan_of(ckpt: dict) -> tuple[OptimConfig, int] | None:
    """The (optim settings, trainer.max_steps) a checkpoint was trained under, when recorded."""
    recorded = ckpt.get("nanoforge_schedule")
    optim = (ckpt.get("hyper_parameters") or {}).get("optim")
    if not isinstance(recorded, dict) or not isinstance(optim, dict):
        return None  # from before plans were recorded
    try:
        return OptimConfig(**optim), int(recorded["max_steps"])
    except (UserError, TypeError, KeyError, ValueError):
        return None


def drop_events_after(path: Path, step: int, saved_at: float | None = None) -> None:
    """Rewrite a TensorBoard event file without its events of a step after ``step`` (and
    those of ``step`` itself written after ``saved_at``: training scalars are logged at the
    count of steps before theirs, so step N+1's land on N). Atomic; untouched when nothing
    goes. (SummaryWriter's ``purge_step`` would only hide them from TensorBoard's Python
    loader: the data server that ``tensorboard --logdir`` uses by default ignores it.)"""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    def later(record: bytes) -> bool:
        event = Event.FromString(record)
        if event.step != step:
            return event.step > step
        return saved_at is not None and event.wall_time > saved_at

    records = list(RawEventFileLoader(str(path)).Load())
    kept = [r for r in records if not later(r)]
    if len(kept) == len(records):
        return

    def write(f) -> None:
        writer = RecordWriter(f)
        for record in kept:
            writer.write(record)

    atomic_write(path, write)


def _best_path(ckpt: dict) -> str | None:
    """The best checkpoint's path that a checkpoint callback's state records."""
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("best_model_path"):
            return str(state["best_model_path"])
    return None


def _lr(config: OptimConfig, max_steps: int, step: int) -> float:
    return config.lr * lr_factor(step, config, max_steps)


@dataclass
class Continuation:
    """Where a resumed run starts. ``path``: the checkpoint to resume from; ``step``: its
    step; ``set_aside``: True when it continues from the cool-down start instead of the
    checkpoint asked for (the part after it is set aside); ``message``/``warning``: the
    line to print."""

    path: Path
    step: int | None = None
    set_aside: bool = False
    message: str | None = None
    warning: str | None = None
    saved_at: float | None = None  # when the cool-down start was saved (time.time())
    best_before: str | None = None  # best.ckpt's path when the cool-down began (if any)
    best_after: str | None = None  # and in the checkpoint asked for

    def apply(self, tensorboard_dirs=()) -> None:
        """Set the cool-down aside in what the run directory records (rank 0, before training
        resumes): best.ckpt becomes the one kept when the cool-down began (none, if the run
        had not validated by then), and the events of the TensorBoard folders from after that
        step are dropped. (samples.txt: ``TextSamples``; the history of metrics.json comes
        from the checkpoint.)"""
        if not self.set_aside or self.step is None:
            return
        for folder in tensorboard_dirs:
            for events in sorted(Path(folder).glob("events.out.tfevents.*")):
                drop_events_after(events, self.step, self.saved_at)
        kept = self.path.parent / BEST_AT_COOLDOWN
        if kept.is_file() and self.best_before:
            os.replace(kept, self.best_before)
            return
        best = Path(self.best_after) if self.best_after else None
        if best is not None and best.is_file():  # no best then: none from the set-aside part
            recorded = _read(best)
            if recorded is None or recorded.get("global_step", 0) > self.step:
                best.unlink()


def plan(ckpt_path: str | os.PathLike, optim: OptimConfig, max_steps: int) -> Continuation:
    """Where a run resumed from ``ckpt_path`` under ``optim`` and ``max_steps`` starts (see
    the module docstring)."""
    asked = Path(ckpt_path).expanduser()
    ckpt = _read(asked) if asked.is_file() else None
    old = _plan_of(ckpt) if ckpt is not None else None
    if old is None:
        return Continuation(asked)  # not ours, or from before plans were recorded: as asked
    step = int(ckpt.get("global_step", 0))
    differs = first_difference(*old, optim, max_steps, step)
    if differs is None or step >= max_steps:  # every step so far as planned, or none to go
        return Continuation(asked, step)

    cooldown = asked.parent / COOLDOWN_CKPT
    saved = _read(cooldown) if cooldown.is_file() and cooldown != asked else None
    at = _plan_of(saved) if saved is not None else None
    if at is not None:
        branch = int(saved.get("global_step", 0))
        same_run = branch <= step and first_difference(*at, *old, branch) is None
        if same_run and first_difference(*at, optim, max_steps, branch) is None:
            return Continuation(
                cooldown,
                branch,
                set_aside=True,
                best_before=_best_path(saved),
                saved_at=saved["nanoforge_schedule"].get("saved_at"),
                best_after=_best_path(ckpt),
                message=(
                    f"{_change(old, optim, max_steps)}: continuing from step {branch}, where "
                    f"the cool-down began ({cooldown}), so the run retraces one planned this "
                    f"way from the start; its cool-down from step {branch} to {step} is set aside"
                ),
            )
    return Continuation(asked, step, warning=_jump(old, optim, max_steps, step, differs))


def _change(old: tuple[OptimConfig, int], optim: OptimConfig, max_steps: int) -> str:
    if old[1] != max_steps:
        verb = "extending" if max_steps > old[1] else "shortening"
        return f"{verb} the run from {old[1]:,} to {max_steps:,} steps"
    return "the run's learning-rate schedule changed"


def _jump(
    old: tuple[OptimConfig, int], optim: OptimConfig, max_steps: int, step: int, differs: int
) -> str:
    """The warning for a resume whose schedule changes under steps already trained."""
    was, now = _lr(*old, step), _lr(optim, max_steps, step)
    length = schedule_length(*old)
    if optim.schedule == "cosine" and max_steps > old[1]:
        return (
            f"optim.schedule=cosine: {_change(old, optim, max_steps)} stretches its cosine, so "
            f"it re-warms: the learning rate climbs back from {was:.3g} to {now:.3g} at step "
            f"{step:,} and val/loss rises before it falls again. To keep the finished schedule "
            f"(the learning rate stays at optim.min_lr), add optim.decay_steps={length}; "
            "runs with optim.schedule=wsd extend exactly"
        )
    jump = (
        f"; the learning rate goes from {was:.3g} to {now:.3g} at step {step:,}"
        if was != now
        else ""
    )
    return (
        f"{_change(old, optim, max_steps)}: its new schedule departs from the one it was trained "
        f"with at step {differs:,}, and no {COOLDOWN_CKPT} from before that step lets it retrace "
        f"a run planned this way, so it goes on from step {step:,}{jump}. To keep the old "
        f"schedule, resume with its settings (optim.decay_steps={length} keeps its length)"
    )


def extension_overrides(schedule: dict, steps: int) -> list[str]:
    """The overrides that extend a finished run of ``steps`` steps to twice as many, as if it
    had been planned that long; ``schedule`` is ``metrics.json``'s ``schedule`` entry
    (:func:`describe`). A ``cosine`` run keeps its decay length: extending it otherwise
    re-warms it."""
    overrides = [f"trainer.max_steps={2 * steps}"]
    decay_steps = schedule.get("decay_steps")
    if schedule.get("name") == "cosine":
        overrides.append(f"optim.decay_steps={decay_steps or steps}")
    elif decay_steps:
        overrides.append(f"optim.decay_steps={2 * decay_steps}")
    return overrides


def describe(optim: OptimConfig, max_steps: int) -> dict:
    """A run's schedule as ``metrics.json`` records it (``schedule``)."""
    from nanoforge.optim import cooldown_start

    return {
        "name": optim.schedule,
        "max_steps": max_steps,
        "decay_steps": optim.decay_steps,
        "cooldown_start": cooldown_start(optim, max_steps),
    }

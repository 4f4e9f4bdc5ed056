"""A run directory belongs to one run.

- **No overwrites.** A directory that holds another run's checkpoints is refused, before
  anything in it is touched, unless this run resumes it (``resume=RUN_DIR``) or the user opted
  in with ``overwrite=true`` (then the files a run writes are removed first, and only those:
  :data:`RUN_OUTPUTS`). A folder that is not a training run's is refused unless it is empty:
  a run would write its ``metrics.json`` and ``samples.txt`` among the user's files.
- **One process at a time.** A training process holds an OS lock on ``RUN_DIR/run.lock``
  (``flock``: it dies with the process, so ``kill -9`` never leaves a stale lock); a second
  process gets a one-line error with the holder's pid.
- **A failed resume leaves the record as it was.** Hydra rewrites ``.hydra/*.yaml`` when a run
  starts; if the process ends without saving a new checkpoint, the files are put back, so the
  next ``resume=RUN_DIR`` does not replay an override that failed.

:class:`RunDirGuard` (a Hydra callback, ``configs/hydra/default.yaml``) does this for single
runs before Hydra writes into the directory; ``claim`` is also called by every training job
(sweep jobs included), where it only takes the lock if the callback has not.
Finding and listing runs (``last``, ``python src/runs.py``) is :mod:`nanoforge.runs`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes
from nanoforge.machine import launcher_rank

LOCK_FILE = "run.lock"
RECORD_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
# What a run writes into its directory, as glob patterns per folder: what overwrite=true
# removes. Anything else (a file the user put into checkpoints/ or tensorboard/) stays.
RUN_OUTPUTS = {
    ".": (
        "trackers.json",  # the MLflow / W&B run ids (nanoforge.loggers)
        "samples.txt",
        "metrics.json",
        "eval.json",
        "job_status.json",
        "hpc_ckpt_*.ckpt",  # Lightning's, for a requeued SLURM job (nanoforge.slurm)
    ),
    # best, last, cooldown_start(.best) and the temporary files of their atomic writes
    "checkpoints": ("*.ckpt", ".*.ckpt.*.tmp", ".*.ckpt.*.link"),
    # Lightning's TensorBoardLogger: RUN/tensorboard/<run name>/ (nanoforge.loggers)
    "tensorboard": (
        "events.out.tfevents.*",
        "hparams.yaml",
        "*/events.out.tfevents.*",
        "*/.events.out.tfevents.*.tmp",
        "*/hparams.yaml",
    ),
    "csv": ("metrics.csv", "hparams.yaml"),  # Lightning's CSVLogger
    # W&B's offline runs and the links and logs it keeps beside them
    "wandb": ("offline-run-*", "run-*", "latest-run", "debug.log", "debug-internal.log"),
}

_held: dict[Path, int] = {}  # run dir -> file descriptor of its lock, for this process's life


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


def _resumes(run_dir: Path, ckpt_path: str | None) -> bool:
    """True when ``ckpt_path`` is one of ``run_dir``'s own checkpoints."""
    if not ckpt_path:
        return False
    ckpt = Path(ckpt_path).expanduser().resolve()
    # checkpoints/*.ckpt, or Lightning's hpc_ckpt_N.ckpt of a requeued SLURM job (nanoforge.slurm)
    return ckpt.parent in ((run_dir / "checkpoints").resolve(), run_dir.resolve())


def lock(run_dir: Path) -> None:
    """Hold ``run_dir/run.lock`` until this process ends; UserError if another holds it."""
    import fcntl

    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use: another training process (pid {holder}) is running in it. "
            "Wait for it to end (or stop it), or train in another directory."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = fd


def is_training_run(run_dir: Path) -> bool:
    """True for a directory a nanoforge training run made: its lock file (every training
    process takes it), or Hydra's record of a training config (its top-level keys; an
    experiment may name its task otherwise than ``train``)."""
    if (run_dir / LOCK_FILE).is_file():
        return True
    try:
        with open(run_dir / ".hydra" / "config.yaml", encoding="utf-8") as f:
            keys = {line.split(":", 1)[0] for line in f if line[:1].isalpha()}
    except (OSError, UnicodeDecodeError):
        return False
    return {"task_name", "model", "optim", "trainer", "ckpt_path"} <= keys


def claim(run_dir: str | os.PathLike, ckpt_path: str | None, overwrite: bool = False) -> None:
    """Make ``run_dir`` this run's: refuse a folder that is neither empty nor a training run,
    and another run's directory; lock it (rank 0 only)."""
    if launcher_rank() != 0:  # DDP ranks > 0 share rank 0's directory (and its lock)
        return
    run_dir = Path(run_dir)
    if run_dir.resolve() in _held:
        return
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_training_run(run_dir):
        held = sorted(p.name for p in run_dir.iterdir())
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise UserError(
            f"{run_dir} is not a nanoforge run directory and is not empty (it holds {shown}); "
            "nothing was changed: a run would write its metrics.json, samples.txt and "
            "checkpoints among these files. Train in a new or empty directory (leave "
            "hydra.run.dir unset for a fresh one under logs/)."
        )
    another_run = bool(_checkpoints(run_dir)) and not _resumes(run_dir, ckpt_path)
    if another_run and not overwrite:
        raise UserError(
            f"{run_dir} holds another run's checkpoints; nothing was changed. Continue that "
            f"run with `python src/train.py resume={run_dir}`, train in a new directory "
            "(leave hydra.run.dir unset), or replace it with overwrite=true."
        )
    lock(run_dir)
    if another_run:  # overwrite=true: the old run's outputs go, its lock is ours now
        remove_outputs(run_dir)


def remove_outputs(run_dir: Path) -> None:
    """Remove what a run wrote into ``run_dir`` (:data:`RUN_OUTPUTS`), and the folders this
    leaves empty; anything else stays."""
    for folder, patterns in RUN_OUTPUTS.items():
        base = run_dir / folder
        for pattern in patterns:
            # a plain name is looked up as it is: glob skips a link whose target is gone
            literal = not any(c in pattern for c in "*?[")
            for target in [base / pattern] if literal else base.glob(pattern):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        if folder != "." and base.is_dir():
            for sub, _, _ in os.walk(base, topdown=False):  # deepest first, links not followed
                with contextlib.suppress(OSError):  # not empty: something of the user's
                    os.rmdir(sub)


class _RecordKeeper:
    """The ``.hydra/`` record of a run directory as it was before this process started; put
    back at exit unless the run saved a new checkpoint meanwhile."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / ".hydra"
        self.files = {
            name: (self.folder / name).read_bytes()
            for name in RECORD_FILES
            if (self.folder / name).is_file()
        }
        self.last = run_dir / "checkpoints" / "last.ckpt"
        self.last_mtime = self._mtime()

    def _mtime(self) -> int | None:
        try:
            return self.last.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def restore_if_unsaved(self) -> None:
        # a failed start may have removed the directory (hydra_setup.run): nothing to restore
        if not self.files or self._mtime() != self.last_mtime or not self.folder.is_dir():
            return
        for name, data in self.files.items():
            if (self.folder / name).read_bytes() != data:
                atomic_write_bytes(self.folder / name, data)


class RunDirGuard(Callback):
    """Hydra callback: claim a single run's directory before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        if launcher_rank() != 0:
            return
        HydraConfig.instance().set_config(config)  # `${hydra:runtime.cwd}` in the run dir
        run_dir = Path(str(config.hydra.run.dir))
        if run_dir.is_dir() and (run_dir / ".hydra").is_dir():
            atexit.register(_RecordKeeper(run_dir).restore_if_unsaved)
        try:
            claim(run_dir, config.get("ckpt_path"), bool(config.get("overwrite", False)))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)


# --------------------------------------------------------------------------- is it running?
def is_running(run_dir: Path) -> bool:
    """True while a process holds the run's lock (it is training in it now)."""
    import fcntl

    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return False

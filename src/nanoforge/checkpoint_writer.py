"""Writing checkpoints, the Trainer's side: a Lightning ``CheckpointIO`` plugin
(``configs/trainer/default.yaml``) that writes each checkpoint atomically. Reading them is
``nanoforge.checkpoint``, which needs no Lightning, so ``generate.py`` never imports it.
"""

from __future__ import annotations

import errno
import shlex
import shutil
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from nanoforge.errors import UserError
from nanoforge.io import atomic_write


def _write_failure(exc: BaseException, folder: Path) -> str | None:
    """Why a checkpoint could not be written, when the user can fix it: the disk (or quota)
    is full, or the file size limit (``ulimit -f``; Python ignores SIGXFSZ, so the write
    fails with EFBIG) was reached. None for anything else."""
    seen, chain = set(), exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device"
        if isinstance(chain, OSError) and chain.errno == errno.EFBIG:
            return _size_limit() or "the file grew larger than this filesystem allows"
        chain = chain.__cause__ or chain.__context__
    # torch's zip writer reports a failed write as "unexpected pos": look at the disk itself
    if "unexpected pos" in str(exc):
        if shutil.disk_usage(folder).free < 64 * 2**20:
            return "no space left on device"
        return _size_limit() or None
    return None


def _size_limit() -> str:
    """``the file size limit (ulimit -f) of N bytes was reached``; "" when there is none."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (ImportError, OSError, ValueError):
        return "the file size limit (ulimit -f) was reached"
    if soft == resource.RLIM_INFINITY:
        return ""
    return f"the file size limit (ulimit -f) of {soft:,} bytes was reached"


def _saved_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path``, read without loading its tensors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception:
        return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe: each checkpoint is written to a temporary
    file in the same folder, flushed to disk, then renamed over the target. A ``kill -9`` at any
    moment leaves either the previous complete file or the new complete file, never half of
    one. (Lightning's own writer opens the target itself and truncates it first.) A full disk,
    or the file size limit (``ulimit -f``), is a one-line error that says the previous
    checkpoint is intact and how to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.saved_steps: dict[Path, int] = {}  # path -> global step of its last good save

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        step = checkpoint.get("global_step")
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as e:
            why = _write_failure(e, path.parent)
            if why is None:
                raise
            before = self.saved_steps.get(path)
            if before is None and path.is_file():  # e.g. the run this one resumed saved it
                before = _saved_step(path)
            intact = (
                f"{path} from step {before} is intact"
                if before is not None
                else "nothing was left half-written"
            )
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            fix = "Free some space" if why.startswith("no space") else "Raise it (ulimit -f)"
            then = (  # resume= continues from last.ckpt
                f"resume: python src/train.py resume={shlex.quote(str(run_dir))}"
                if (path.parent / "last.ckpt").is_file()
                else "start the run again (no checkpoint to resume from was saved yet)"
            )
            raise UserError(
                f"{why} while saving {path.name} at step {step}; {intact}. {fix}, then {then}"
            ) from None
        self.saved_steps[path] = step

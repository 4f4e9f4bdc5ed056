"""Writing checkpoints, the Trainer's side: a Lightning ``CheckpointIO`` plugin
(``configs/trainer/default.yaml``) that writes each checkpoint atomically. Reading them is
``nanoforge.checkpoint``, which needs no Lightning, so ``generate.py`` never imports it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from nanoforge.errors import UserError
from nanoforge.io import atomic_write


def _disk_full(exc: BaseException, folder: Path) -> bool:
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    # torch's zip writer reports a failed write as "unexpected pos": look at the disk itself
    return "unexpected pos" in str(exc) and shutil.disk_usage(folder).free < 64 * 2**20


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe: each checkpoint is written to a temporary
    file in the same folder, flushed to disk, then renamed over the target. A ``kill -9`` at any
    moment leaves either the previous complete file or the new complete file, never half of
    one. (Lightning's own writer opens the target itself and truncates it first.) A full disk
    is a one-line error that says the previous checkpoint is intact and how to go on."""

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
            if not _disk_full(e, path.parent):
                raise
            before = self.saved_steps.get(path)
            intact = (
                f"{path} from step {before} is intact"
                if before is not None
                else f"any earlier {path.name} is intact"
            )
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            raise UserError(
                f"no space left on device while saving {path.name} at step {step}; {intact}. "
                f"Free some space, then resume: python src/train.py resume={run_dir}"
            ) from None
        self.saved_steps[path] = step

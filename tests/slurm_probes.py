"""Test probes loaded into SLURM jobs by their dotted path (tests/test_slurm.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L


class Pace(L.Callback):
    """Slows training to ``seconds`` per step (so a signal finds the job mid-run) and, on each
    rank, appends to ``<out_dir>/starts.jsonl`` one line per fit start: its rank, the job's
    SLURM restart count and the step it starts from; writes ``<out_dir>/running`` once a
    training step is done."""

    def __init__(self, out_dir: str, seconds: float = 0.0):
        self.out_dir, self.seconds = Path(out_dir), seconds

    def on_train_start(self, trainer, pl_module) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "job": os.environ.get("SLURM_JOB_ID"),
            "step": trainer.global_step,
        }
        with open(self.out_dir / "starts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            (self.out_dir / "running").touch()
        time.sleep(self.seconds)

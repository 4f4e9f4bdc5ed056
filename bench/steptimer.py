"""A Lightning callback for the benchmarks (not part of nanoforge): the wall-clock time at the
end of every optimizer step, written to a JSON file when training ends.

`bench/compare.py` adds it from the command line, with ``bench/`` on PYTHONPATH:

    python src/train.py ... +callbacks.step_timer._target_=steptimer.StepTimer \\
        +callbacks.step_timer.path=steps.json

The file holds ``{"step_ends": [t1, t2, ...]}`` in seconds since the epoch (``time.time()``, so
a parent process can subtract its own launch time) and ``perf`` (the same instants on the
``perf_counter`` clock, for intervals) and ``cpu`` (this process's CPU seconds,
``process_time``: with one thread, a step's cost that other processes on the machine do not
inflate). Step k's duration is ``perf[k] - perf[k-1]``: data
loading, forward, backward, clipping, the optimizer step and the loop's own overhead, exactly
what nanoGPT's ``time ... ms`` per iteration measures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L


class StepTimer(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)
        self.step_ends: list[float] = []
        self.perf: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.perf.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.step_ends.append(time.time())
        if len(self.step_ends) == 1:  # the first step: written at once (the run may be cut)
            self._write()

    def on_train_end(self, trainer, pl_module) -> None:
        self._write()

    def _write(self) -> None:
        self.path.write_text(
            json.dumps({"step_ends": self.step_ends, "perf": self.perf, "cpu": self.cpu})
        )

"""nanoforge.machine: the machine as this process sees it (cores, GPUs, sweep jobs at once)."""

from nanoforge import machine
from nanoforge.machine import parallel_jobs
from tests.helpers import compose


def test_parallel_jobs_is_one_per_gpu_else_one_per_core(monkeypatch):
    monkeypatch.setattr(machine, "cpu_cores", lambda: 8)
    monkeypatch.setattr(machine, "gpu_count", lambda: 0)
    assert parallel_jobs() == 8
    monkeypatch.setattr(machine, "gpu_count", lambda: 4)
    assert parallel_jobs() == 4
    monkeypatch.undo()
    # hydra/launcher=parallel runs that many jobs at once
    launcher = compose(["hydra/launcher=parallel"], return_hydra_config=True).hydra.launcher
    assert launcher.n_jobs == parallel_jobs()

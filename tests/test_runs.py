"""nanoforge.runs: finding runs and listing them.

A run's status comes from what its directory holds (and whether its lock is held); the list
shows runs newest first, a resumed run with its first start and its last resume and without
the overrides resume= adds; ``last`` (``resume=last``, ``ckpt=last``) is the most recent run
with a checkpoint, and says which it chose.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nanoforge import runs
from nanoforge.checkpoint import resolve_checkpoint
from nanoforge.cli import expand_resume
from nanoforge.errors import UserError
from nanoforge.runs import find_runs, latest_run
from tests.helpers import make_run


def test_status_comes_from_what_the_directory_holds(tmp_path):
    now = time.time()
    finished = make_run(tmp_path, "a", now, metrics={"status": "finished", "steps": 9})
    legacy = make_run(tmp_path, "b", now, metrics={"steps": 9})  # before metrics had a status
    stopped = make_run(tmp_path, "c", now, metrics={"status": "stopped"})
    killed = make_run(tmp_path, "d", now)  # kill -9: a checkpoint, no summary
    failed = make_run(tmp_path, "e", now, metrics={"status": "failed", "error": "nan"})
    crashed = make_run(tmp_path, "f", now, ckpt=False)
    statuses = [runs.run_status(r)[0] for r in (finished, legacy, stopped, killed, failed, crashed)]
    assert statuses == ["finished", "finished", "stopped", "stopped", "failed", "failed"]


def test_runs_are_listed_newest_first_with_status_loss_and_overrides(tmp_path):
    now = time.time()
    make_run(
        tmp_path, "old", now - 3600, metrics={"status": "finished", "steps": 50, "val/loss": 2.5}
    )
    make_run(tmp_path, "new", now, metrics={"status": "stopped", "steps": 20, "val/loss": 3.25})
    job = tmp_path / "train" / "multiruns" / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 1\n")
    os.utime(job / ".hydra" / "config.yaml", (now - 60, now - 60))
    assert [p.name for p in find_runs(tmp_path)] == ["new", "0", "old"]
    lines = runs.list_runs(tmp_path).splitlines()
    head = ["started", "resumed", "status", "steps", "val/loss", "run", "overrides"]
    assert lines[0].split() == head
    assert lines[1].split()[2:6] == ["—", "stopped", "20", "3.2500"] and "seed=new" in lines[1]
    assert lines[2].split()[3] == "failed" and "multiruns/sweep/0" in lines[2]
    assert lines[3].split()[2:6] == ["—", "finished", "50", "2.5000"]
    assert "no runs under" in runs.list_runs(tmp_path / "empty")
    (tmp_path / "train" / "runs" / "new" / "metrics.json").write_text("[1, 2]")  # JSON, no object
    assert runs.list_runs(tmp_path).splitlines()[1].split()[3] == "stopped"  # has last.ckpt


def test_a_resumed_run_shows_its_start_and_its_last_resume_without_internal_overrides(tmp_path):
    """It showed the last resume as the start, and ckpt_path=..., which resume= adds."""
    started = time.mktime(time.strptime("2026-12-06 09:30:00", "%Y-%m-%d %H:%M:%S"))
    resumed = started + 3 * 3600
    run = make_run(tmp_path, "r", resumed, metrics={"status": "finished", "steps": 60})
    (run / "train.log").write_text(
        "[2026-12-06 09:30:00,233][nanoforge.training][INFO] - run directory: r\n"
        "[2026-12-06 12:30:00,117][nanoforge.training][INFO] - run directory: r\n"
    )
    OmegaConf.save(
        OmegaConf.create(["model=tiny", "trainer.max_steps=60", f"ckpt_path={run}/x.ckpt"]),
        run / ".hydra" / "overrides.yaml",
    )
    row = runs.list_runs(tmp_path).splitlines()[1]
    assert row.startswith("2026-12-06 09:30  2026-12-06 12:30  finished  60 ")
    assert row.endswith("  model=tiny trainer.max_steps=60")


def test_last_is_the_most_recent_run_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    now = time.time()
    older = make_run(tmp_path / "logs", "older", now - 60)
    make_run(tmp_path / "logs", "newest", now, ckpt=False)  # failed before any checkpoint
    monkeypatch.chdir(tmp_path)
    assert latest_run("logs") == Path("logs") / "train" / "runs" / "older"
    assert resolve_checkpoint("last") == Path("logs/train/runs/older/checkpoints/last.ckpt")
    # ckpt=last, init_from=last: which run, before anything is loaded
    assert capsys.readouterr().err.startswith(f"last = {Path('logs/train/runs/older')} (")
    argv = expand_resume(["train.py", "resume=last", "trainer.max_steps=9"])
    assert argv[-2:] == [
        f"hydra.run.dir={Path('logs/train/runs/older')}",
        f"ckpt_path={Path('logs/train/runs/older/checkpoints/last.ckpt')}",
    ]
    assert older.is_dir()
    monkeypatch.chdir(tmp_path / "logs")
    with pytest.raises(UserError, match="no run under logs/"):
        resolve_checkpoint("last")

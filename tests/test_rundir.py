"""nanoforge.rundir: a run directory belongs to one run, and runs can be found.

``claim`` refuses a directory holding another run's checkpoints (unless it resumes that run,
or ``overwrite=true`` clears its outputs) and locks it; a run's status comes from what its
directory holds (and whether its lock is held); ``list_runs`` shows them newest first, and
``last`` (``resume=last``, ``ckpt=last``) finds the most recent one. The same guarantees on
the real entry point, in subprocesses: test_e2e_run_directory.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nanoforge import rundir, runs
from nanoforge.checkpoint import resolve_checkpoint
from nanoforge.cli import expand_resume
from nanoforge.errors import UserError
from nanoforge.runs import find_runs, latest_run


def make_run(log_dir: Path, name: str, started: float, *, metrics=None, ckpt=True) -> Path:
    run = log_dir / "train" / "runs" / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(["model=tiny", f"seed={name}"]), run / ".hydra" / "overrides.yaml"
    )
    (run / ".hydra" / "config.yaml").write_text(
        "task_name: train\nmodel: {}\noptim: {}\ntrainer: {}\nckpt_path: null\nseed: 1\n"
    )
    os.utime(run / ".hydra" / "config.yaml", (started, started))
    if ckpt:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_claim_refuses_another_runs_directory_unless_resumed_or_overwritten(tmp_path):
    run = make_run(tmp_path, "r", time.time(), metrics={"status": "finished"})
    with pytest.raises(UserError, match=r"another run's checkpoints.*resume=.*overwrite=true"):
        rundir.claim(run, ckpt_path=None)
    with pytest.raises(UserError, match="another run's checkpoints"):
        rundir.claim(run, ckpt_path=str(tmp_path / "elsewhere" / "last.ckpt"))
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "run.lock").exists()

    rundir.claim(run, ckpt_path=str(run / "checkpoints" / "last.ckpt"))  # its own resume
    assert rundir.is_running(run)  # this process holds the lock now

    other = make_run(tmp_path, "o", time.time(), metrics={"status": "finished"})
    (other / "samples.txt").write_text("old")
    rundir.claim(other, ckpt_path=None, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == [".hydra", "run.lock"]


def test_a_folder_that_is_not_a_run_is_refused_unless_empty(tmp_path):
    """hydra.run.dir= a user's own folder: its metrics.json and samples.txt are theirs."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"mine": 1}')
    (mine / "samples.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(
            UserError,
            match=r"mine is not a nanoforge run directory and is not empty \(it "
            r"holds metrics.json, samples.txt\); nothing was changed.*new or empty directory",
        ):
            rundir.claim(mine, ckpt_path=None, overwrite=overwrite)
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.json", "samples.txt"]
    # another program's Hydra output is not a training run either
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("task_name: my_app\nmodel: {}\n")
    with pytest.raises(UserError, match="not a nanoforge run directory"):
        rundir.claim(other, ckpt_path=None)
    for fine in (tmp_path / "new", tmp_path / "empty"):  # missing or empty: ours to fill
        if fine.name == "empty":
            fine.mkdir()
        rundir.claim(fine, ckpt_path=None)
        assert rundir.is_running(fine)
    killed = tmp_path / "killed"  # a run stopped before its first checkpoint: its lock file
    killed.mkdir()
    (killed / "run.lock").write_text("123\n")
    (killed / "train.log").write_text("")
    rundir.claim(killed, ckpt_path=None)


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    run = make_run(tmp_path, "r", time.time(), metrics={"status": "finished"})
    ckpts, tb = run / "checkpoints", run / "tensorboard" / "default"
    tb.mkdir(parents=True)
    for path in (
        ckpts / "best.ckpt",
        ckpts / "cooldown_start.ckpt",
        ckpts / ".last.ckpt.host.123.abc.tmp",
        tb / "events.out.tfevents.1.host.1.0",
        tb / "hparams.yaml",
        run / "samples.txt",
        run / "wandb" / "offline-run-1-x" / "run-x.wandb",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("run output")
    (run / "wandb" / "latest-run").symlink_to(run / "wandb" / "offline-run-1-x")
    # the user's own files, inside the run's folders
    for path in (ckpts / "notes.md", run / "tensorboard" / "README", tb / "plot.png", run / "a.py"):
        path.write_text("mine")
    rundir.claim(run, ckpt_path=None, overwrite=True)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "a.py",
        "checkpoints/notes.md",
        "run.lock",
        "tensorboard/README",
        "tensorboard/default/plot.png",
    ]
    assert not (run / "wandb").exists()  # emptied: removed


def test_a_locked_directory_names_the_process_that_holds_it(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from nanoforge import rundir; "
            "from pathlib import Path; rundir.lock(Path(sys.argv[2])); print('locked', flush=True);"
            " sys.stdin.read()",
            str(Path(rundir.__file__).parents[1]),
            str(run),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            UserError, match=f"in use: another training process \\(pid {holder.pid}\\)"
        ):
            rundir.lock(run)
        assert runs.run_status(run)[0] == "running"
    finally:
        holder.kill()
        holder.wait()
    assert not rundir.is_running(run)  # the lock died with its process
    rundir.lock(run)


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


def test_a_record_kept_for_a_directory_that_a_failed_start_removed_is_not_restored(tmp_path):
    """A second failing start into a directory holding only a killed run's record: the
    failed start removes the directory (hydra_setup.run), and the exit hook that puts the
    record back finds nothing to restore (it raised FileNotFoundError at exit)."""
    import shutil

    run = make_run(tmp_path, "r", time.time(), ckpt=False)
    keeper = rundir._RecordKeeper(run)
    shutil.rmtree(run)
    keeper.restore_if_unsaved()
    assert not run.exists()

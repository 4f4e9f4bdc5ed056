"""nanoforge.rundir: a run directory belongs to one run (finding and listing runs: test_runs.py).

``claim`` refuses a directory holding another run's checkpoints (unless it resumes that run,
or ``overwrite=true`` clears its outputs) and locks it; a failed start leaves the record as it
was. The same guarantees on the real entry point, in subprocesses: test_e2e_run_directory.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoforge import rundir, runs
from nanoforge.errors import UserError
from tests.helpers import make_run


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

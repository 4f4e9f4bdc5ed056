"""End to end: a run directory belongs to one run, and a stop is fast and resumable.

The real ``src/train.py``: another run's directory is refused untouched, two processes never
train in one directory, a resume never swaps the text or the model, SIGTERM during a long
validation saves and exits at once, and every run ends with a validation. What only a process
shows (a second process, kill -9, SIGTERM, ulimit -f, a sweep's jobs) runs in subprocesses; the
refusals and plain runs run in this process (tests.helpers.run_main: the same command line,
Hydra and task runner, the exit code as SystemExit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import ROOT, SRC, clean_env, make_text, run_entry, run_main

pytestmark = pytest.mark.slow

FAST = [
    "model=tiny",
    "data=text",
    "data.path=a.txt",
    "data.val_batches=2",
    "trainer.val_check_interval=10",
    "callbacks.text_samples.max_new_tokens=5",
    "logger=tensorboard",
    "trainer.enable_progress_bar=false",
    "print_config=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder with the two texts and R: a finished 20-step run on a.txt (trained once)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "a.txt").write_text(make_text(20_000, seed=1), encoding="utf-8")
    # another text over exactly the same characters: only its content differs
    (folder / "b.txt").write_text(make_text(20_000, seed=2), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        args = [*FAST, "trainer.max_steps=20", "hydra.run.dir=R"]
        code, _, _ = run_main("train.py", *args, cwd=folder, monkeypatch=mp)
    assert code == 0
    return folder


@pytest.fixture
def cwd(trained, tmp_path) -> Path:
    """A fresh copy of ``trained`` for one test."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    (tmp_path / "R" / "run.lock").unlink(missing_ok=True)
    return tmp_path


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the lock) -> sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


@pytest.fixture
def train_here(monkeypatch, capsys):
    """``train_here(cwd, *args)``: ``python src/train.py FAST ARGS`` from ``cwd``, run in this
    process; returns (exit code, stdout, stderr)."""

    def run(cwd: Path, *args: str, fast: bool = True):
        args = (*FAST, *args) if fast else args
        return run_main("train.py", *args, cwd=cwd, monkeypatch=monkeypatch, capsys=capsys)

    return run


class MarkValidation(L.Callback):
    """Test probe, loaded into the training subprocess by its dotted path: touches
    ``<out>/validating`` when a validation starts, so a test signals inside it, not by a clock,
    and keeps the count of validation batches run in ``<out>/validated``."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.batches = 0

    def on_validation_start(self, trainer, pl_module) -> None:
        (self.out / "validating").touch()

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self.batches += 1
        (self.out / "validated").write_text(str(self.batches))


def popen(cwd: Path, *args: str) -> subprocess.Popen:
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # the probe
    return subprocess.Popen(
        [sys.executable, str(SRC / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_error_line(r: subprocess.CompletedProcess | tuple[int, str, str]) -> str:
    """The one error line of a run (a subprocess's or train_here's) that exited 2."""
    code, stderr = (r.returncode, r.stderr) if hasattr(r, "returncode") else (r[0], r[2])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[-1]


def test_another_runs_directory_is_refused_untouched_unless_overwrite(cwd, train_here):
    before = digest(cwd / "R")
    r = train_here(cwd, "trainer.max_steps=10", "seed=7", "hydra.run.dir=R")
    line = one_error_line(r)
    assert "another run's checkpoints" in line and "resume=R" in line and "overwrite=true" in line
    assert digest(cwd / "R") == before  # checkpoints, metrics, .hydra, train.log, events

    (cwd / "R" / "checkpoints" / "notes.md").write_text("mine")  # the user's, kept
    code, _, err = train_here(
        cwd, "trainer.max_steps=10", "seed=7", "hydra.run.dir=R", "overwrite=true"
    )
    assert code == 0, err[-2000:]
    metrics = json.loads((cwd / "R" / "metrics.json").read_text())
    assert metrics["steps"] == 10 and [h["step"] for h in metrics["history"]] == [10]
    assert len(list((cwd / "R" / "tensorboard").glob("*/events.*"))) == 1  # no mixed runs
    assert (cwd / "R" / "checkpoints" / "notes.md").read_text() == "mine"

    mine = cwd / "mine"  # a folder of the user's: refused, whatever overwrite says
    mine.mkdir()
    (mine / "metrics.json").write_text("{}")
    (mine / "samples.txt").write_text("my notes")
    r = train_here(cwd, "trainer.max_steps=10", "hydra.run.dir=mine", "overwrite=true")
    assert "mine is not a nanoforge run directory and is not empty" in one_error_line(r)
    assert digest(mine) == {
        "metrics.json": hashlib.sha256(b"{}").hexdigest(),
        "samples.txt": hashlib.sha256(b"my notes").hexdigest(),
    }


def test_a_resume_on_other_text_or_into_a_run_in_use_is_refused_and_kill_9_leaves_no_lock(
    cwd, train_here
):
    """A resume on other text is one line and keeps the run's record (the checks themselves,
    other model included: tests/test_checkpoint.py; fine-tuning with init_from=:
    tests/test_training.py); a second process never trains in a directory in use; kill -9
    leaves no lock: a plain resume=R works after both."""
    record = digest(cwd / "R" / ".hydra")
    checkpoints = digest(cwd / "R" / "checkpoints")
    # a subprocess: the record is put back when the process exits (nanoforge.rundir)
    r = run_entry("train.py", "resume=R", "data.path=b.txt", "trainer.max_steps=30", cwd=cwd)
    line = one_error_line(r)
    assert "a.txt" in line and "b.txt" in line and "init_from=" in line
    # nothing was saved, so the run's record is as it was
    assert digest(cwd / "R" / ".hydra") == record
    assert digest(cwd / "R" / "checkpoints") == checkpoints

    first = popen(cwd, "resume=R", "trainer.max_steps=100000")
    try:
        deadline = time.time() + 120  # until it trains: resumed, the directory locked
        while "resuming from" not in (cwd / "R" / "train.log").read_text():
            assert time.time() < deadline and first.poll() is None, "the first never resumed"
            time.sleep(0.2)
        second = run_entry("train.py", "resume=R", "trainer.max_steps=100000", cwd=cwd)
        line = one_error_line(second)
        assert "in use" in line and f"pid {first.pid}" in line
    finally:
        first.kill()  # kill -9: the OS drops the lock with the process
        first.wait()
    code, _, err = train_here(cwd, "resume=R", "trainer.max_steps=30", fast=False)
    assert code == 0, err[-2000:]
    assert json.loads((cwd / "R" / "metrics.json").read_text())["steps"] >= 30


def test_a_checkpoint_save_past_ulimit_f_is_one_line_and_keeps_the_last_good_file(cwd):
    """``ulimit -f`` below a checkpoint's size (what a full disk does too: the write fails),
    set for the resumed process alone."""
    import resource

    checkpoints = digest(cwd / "R" / "checkpoints")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, resource.RLIM_INFINITY))

    r = subprocess.run(
        [sys.executable, str(SRC / "train.py"), "resume=R", "trainer.max_steps=21"],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=limit,
    )
    line = one_error_line(r)
    assert "error: the file size limit (ulimit -f) of 600,000 bytes was reached while" in line
    assert re.search(r"saving \w+\.ckpt at step \d+; .+ from step \d+ is intact", line), line
    resume = shlex.quote(f"{cwd}/R")  # one shell word, with TMPDIR holding a space too
    assert line.endswith(f"Raise it (ulimit -f), then resume: python src/train.py resume={resume}")
    assert digest(cwd / "R" / "checkpoints") == checkpoints  # nothing half-written


def test_ckpt_path_of_another_model_size_is_one_line_and_leaves_no_directory(cwd, train_here):
    r = train_here(
        cwd, "trainer.max_steps=20", "model.n_embd=32", "ckpt_path=R/checkpoints/last.ckpt"
    )
    assert "n_embd 64 in the checkpoint, 32 in the config" in one_error_line(r)
    runs = cwd / "logs" / "train" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []  # the new run left nothing


def test_sigterm_in_a_long_validation_saves_and_exits_at_once_and_resumes_exactly(cwd, train_here):
    # R (the fixture) is the straight 20-step run; this one is the same, but its validations
    # take 200,000 batches (many minutes): the first one starts at step 10
    probe = ["+callbacks.probe._target_=tests.test_e2e_run_directory.MarkValidation"]
    probe += ["+callbacks.probe.out=${paths.output_dir}"]
    proc = popen(
        cwd, *FAST, "trainer.max_steps=20", "data.val_batches=200000", "hydra.run.dir=S", *probe
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (cwd / "S" / "validating").is_file():
        time.sleep(0.1)
    time.sleep(1)  # inside the first validation (at step 10), which would take many minutes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    # it left inside the validation, not after its 200,000 batches
    assert int((cwd / "S" / "validated").read_text()) < 200_000
    assert "stopped at step 10" in err and "resume=" in err
    last = torch.load(cwd / "S" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10
    metrics = json.loads((cwd / "S" / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["status"] == "stopped"

    # the probe's _target_ is given again: resume= replays only plain values (docs/command-line.md)
    code, _, err = train_here(cwd, "resume=S", "data.val_batches=2", probe[0], fast=False)
    assert code == 0, err[-2000:]
    resumed = torch.load(cwd / "S" / "checkpoints" / "last.ckpt", weights_only=True)
    straight = torch.load(cwd / "R" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 20
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    final = [json.loads((cwd / d / "metrics.json").read_text()) for d in ("S", "R")]
    assert final[0]["val/loss"] == final[1]["val/loss"]


def test_a_sweep_of_runs_shorter_than_the_validation_interval_validates_each(cwd, train_here):
    code, _, err = train_here(
        cwd,
        "-m",
        *[a for a in FAST if not a.startswith("trainer.val_check_interval")],
        "optim.lr=1e-3,3e-3",
        "trainer.max_steps=7",  # the default interval is 250 steps
        "hydra.sweep.dir=sweep",
        fast=False,
    )
    assert code == 0, err[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((cwd / "sweep" / job / "metrics.json").read_text())
        assert [h["step"] for h in metrics["history"]] == [7]
    assert "2 ok" in (cwd / "sweep" / "report.md").read_text()

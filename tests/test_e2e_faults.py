"""End to end: kills, signals and divergence in real `python src/train.py` runs.

kill -9 at any moment leaves only complete checkpoints, and the run resumes to completion;
SIGTERM saves, flushes and says how to resume (exit 143); a diverging run exits 2 naming the
step. (The in-process NaN handling is in test_module.py, the checkpoint writer under kill -9
in test_checkpoint.py.) The diverging run runs the entry point in this process
(tests.helpers.run_main: the same command line, Hydra and task runner, the exit code as
SystemExit); kills and signals need a process of their own.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoforge.checkpoint import check_resumable
from tests.helpers import SRC, clean_env, make_text, run_main, tb_dir

pytestmark = pytest.mark.slow


ARGS = [
    "model=tiny",
    "data=text",
    "data.path=corpus.txt",
    "data.val_batches=1",
    "trainer.val_check_interval=5",
    "logger=tensorboard",
    "callbacks.text_samples.max_new_tokens=10",
    "trainer.max_steps=100000",
]


def _train(cwd: Path, *args: str) -> subprocess.Popen:
    env = clean_env()
    return subprocess.Popen(
        [sys.executable, str(SRC / "train.py"), *ARGS, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-3000:]}")
        if line.startswith("step ") and int(line.split(":")[0].split()[1].split("/")[0]) >= step:
            return
    raise AssertionError("no validation line in time")


def _resume(cwd: Path, run: Path, *args: str) -> subprocess.Popen:
    env = clean_env()
    return subprocess.Popen(
        [sys.executable, str(SRC / "train.py"), f"resume={run}", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_during_training_then_resume_to_completion(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    run = tmp_path / "run"
    for i, kill_after in enumerate((10, 25)):
        proc = _train(tmp_path, f"hydra.run.dir={run}") if i == 0 else _resume(tmp_path, run)
        _wait_for_step(proc, kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for ckpt in (run / "checkpoints").glob("*.ckpt"):
            check_resumable(ckpt)  # every file on disk is a complete checkpoint
    step_before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step_before >= 20  # at most one validation interval (5 steps) was lost
    proc = _resume(tmp_path, run, "trainer.max_steps=60")
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 60
    assert json.loads((run / "metrics.json").read_text())["steps"] == 60


def test_sigterm_saves_flushes_and_says_how_to_resume(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    run = tmp_path / "run"
    proc = _train(tmp_path, f"hydra.run.dir={run}")
    _wait_for_step(proc, 10)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert f"Resume with: python src/train.py resume={shlex.quote(str(run))}" in err
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    metrics = json.loads((run / "metrics.json").read_text())  # flushed on the way out
    assert metrics["steps"] == last["global_step"] >= 10 and metrics["status"] == "stopped"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "val/loss" in EventAccumulator(str(tb_dir(run))).Reload().Tags()["scalars"]


def test_divergence_in_a_real_run_exits_2_naming_the_step(tmp_path, monkeypatch, capsys):
    (tmp_path / "corpus.txt").write_text(make_text(20_000), encoding="utf-8")
    code, _, err = run_main(
        "train.py",
        *ARGS,
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "trainer.max_steps=50",
        "trainer.gradient_clip_val=null",
        cwd=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 2, err[-2000:]
    assert "error: the training loss became" in err and "at step" in err
    assert "Traceback" not in err

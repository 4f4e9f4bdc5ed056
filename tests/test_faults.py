"""Kills, signals and divergence: nothing on disk is ever half-written, nothing is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from nanoforge.checkpoint import AtomicCheckpointIO, check_resumable
from nanoforge.errors import NonFiniteLossError
from nanoforge.module import GPTModule
from nanoforge.tokenizer import CharTokenizer
from tests.conftest import SRC, make_text

pytestmark = pytest.mark.slow

WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {src!r})
    from nanoforge.checkpoint import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    i = 0
    print("ready", flush=True)
    while True:  # ~40 MB per checkpoint: kills land mid-write
        io.save_checkpoint({{"i": i, "w": torch.full((10_000_000,), float(i))}}, {target!r})
        i += 1
    """
)


def test_kill_9_during_checkpoint_writes_never_leaves_a_broken_file(tmp_path):
    target = tmp_path / "last.ckpt"
    rng = random.Random(0)
    seen = set()
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER.format(src=str(SRC), target=str(target))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():  # whatever is there is complete and loadable
            ckpt = torch.load(target, weights_only=True)
            assert torch.all(ckpt["w"] == float(ckpt["i"]))
            seen.add(ckpt["i"])
    assert seen, "no checkpoint was ever completed"
    # the next save cleans up temporary files an earlier kill left behind
    AtomicCheckpointIO().save_checkpoint({"i": -1}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _train(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [
            sys.executable,
            str(SRC / "train.py"),
            "model=tiny",
            "data=text",
            "data.path=corpus.txt",
            "data.val_batches=1",
            "trainer.val_check_interval=5",
            "logger=tensorboard",
            "callbacks.text_samples.max_new_tokens=10",
            "trainer.max_steps=100000",
            *args,
        ],
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
        if line.startswith("step ") and int(line.split(":")[0].split()[1]) >= step:
            return
    raise AssertionError("no validation line in time")


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


def _resume(cwd: Path, run: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, str(SRC / "train.py"), f"resume={run}", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_saves_flushes_and_says_how_to_resume(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    run = tmp_path / "run"
    proc = _train(tmp_path, f"hydra.run.dir={run}")
    _wait_for_step(proc, 10)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert f"Resume with: python src/train.py resume={run}" in err
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    metrics = json.loads((run / "metrics.json").read_text())  # flushed on the way out
    assert metrics["steps"] == last["global_step"] >= 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "val/loss" in EventAccumulator(str(run / "tensorboard")).Reload().Tags()["scalars"]


# --------------------------------------------------------------------------- divergence
TOK = CharTokenizer.from_text("abcdefgh \n")


class PoisonedModule(GPTModule):
    """Returns a NaN loss on the given training calls (what an exploding run looks like)."""

    def __init__(self, poisoned: set[int], **kw):
        super().__init__(
            model={
                "vocab_size": TOK.vocab_size,
                "block_size": 8,
                "n_layer": 1,
                "n_head": 1,
                "n_embd": 8,
            },
            optim={"warmup_steps": 0},
            tokenizer=TOK.state_dict(),
            **kw,
        )
        self.poisoned, self.calls = poisoned, 0

    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        if loss is not None and self.training:
            if self.calls in self.poisoned:
                loss = loss * float("nan")
            self.calls += 1
        return logits, loss


def _fit(module, tmp_path, steps=12):
    x = torch.randint(TOK.vocab_size, (2, 8))
    data = torch.utils.data.DataLoader([(x, x)] * 100, batch_size=None)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_last=True, every_n_train_steps=1
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=data)
    return trainer


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="became nan at step 5"):
        _fit(PoisonedModule(poisoned=set(range(5, 100))), tmp_path)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_nan_batches_can_be_skipped_and_counted(tmp_path):
    module = PoisonedModule(poisoned={5, 6, 7}, skip_nonfinite=True)
    trainer = _fit(module, tmp_path, steps=10)
    # a skipped batch still counts as a step (Lightning steps the optimizer with no gradients,
    # so nothing is updated); training ran to the end
    assert trainer.global_step == 10 and module.calls == 10
    assert module.skipped_batches == 3
    assert trainer.callback_metrics["train/skipped_batches"] == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_divergence_in_a_real_run_exits_2_naming_the_step(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text(20_000), encoding="utf-8")
    proc = _train(
        tmp_path,
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "trainer.max_steps=50",
        "trainer.gradient_clip_val=null",
    )
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "error: the training loss became" in err and "at step" in err
    assert "Traceback" not in err

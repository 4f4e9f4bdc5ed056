"""End to end: DDP for real on this CPU: trainer=ddp_cpu, 2 processes (gloo), alone and
inside a sweep.

What must hold: one run directory for both ranks (not one per rank), checkpoints, TensorBoard
events, samples and metrics.json written once (by rank 0), each rank drawing its own batch of
data.batch_size windows (the global batch is 2 x data.batch_size, as configs/trainer/ddp_cpu.yaml
documents), and the same weights on both ranks at the end. (That the device configs compose
is in test_configs.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import (
    ROOT,
    SRC,
    clean_env,
    make_text,
    read_csv,
    run_dirs,
    run_entry,
    with_pythonpath,
)

pytestmark = pytest.mark.slow

BATCH, BLOCK, STEPS = 12, 32, 6


class SaveRankState(L.Callback):
    """Test probe, loaded into the training subprocesses by its dotted path: every rank saves
    its first training batch and its final weights to ``<out_dir>/rank<r>.pt``."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.first_x: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_x is None:
            self.first_x = batch[0].detach().cpu().clone()

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "pid": os.getpid(),
                "first_x": self.first_x,
                "weights": state,
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


ARGS = [
    "model=tiny",
    "data=text",
    "data.path=corpus.txt",
    f"data.batch_size={BATCH}",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=3",
    "data.val_batches=2",
    "callbacks.text_samples.max_new_tokens=20",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_config=false",
    "+callbacks.rank_probe._target_=tests.test_e2e_ddp.SaveRankState",
    "+callbacks.rank_probe.out_dir=${paths.output_dir}",
]


def run_train(cwd: Path, *args: str):
    (cwd / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    # the probe's module must import in both ranks' processes
    env = with_pythonpath(ROOT)
    r = run_entry("train.py", *args, cwd=cwd, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def check_ddp_run_dir(run: Path) -> None:
    """Both ranks trained into ``run``; what must be written once was written once."""
    ranks = [torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [s["rank"] for s in ranks] == [0, 1] and {s["world_size"] for s in ranks} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two processes
    # each rank drew its own batch of data.batch_size windows: the global batch is 2 x that
    assert ranks[0]["first_x"].shape == ranks[1]["first_x"].shape == (BATCH, BLOCK)
    assert not torch.equal(ranks[0]["first_x"], ranks[1]["first_x"])
    # gradients were averaged at every step: the same weights on both ranks at the end
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert all(torch.equal(saved[k], w0[k]) for k in w0)

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(list((run / "tensorboard").glob("*/events.out.tfevents.*"))) == 1
    assert (run / "samples.txt").read_text().count("===== step ") == 2  # 2 validations, once
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == STEPS
    assert m["tokens_seen"] == STEPS * 2 * BATCH * BLOCK  # both ranks' tokens
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran in this directory too


def test_sweep_across_cpu_and_ddp_cpu(tmp_path):
    """`-m trainer=cpu,ddp_cpu`: rank 1 of the DDP job joins that job's directory, and does
    not start a sweep of its own (it would if it re-ran the sweep's command line); the DDP job
    leaves what a DDP run leaves (check_ddp_run_dir). That a single DDP run makes one run
    directory, not one per rank: test_sigterm_and_nan_stop_every_rank_under_ddp."""
    run_train(tmp_path, "-m", "trainer=cpu,ddp_cpu", *ARGS)
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert not (tmp_path / "logs" / "train" / "runs").exists()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    check_ddp_run_dir(sweep / "1")
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert "trainer=cpu" in rows[0]["overrides"] and "trainer=ddp_cpu" in rows[1]["overrides"]
    # the DDP job's steps saw twice the tokens of the single-process job's
    assert int(rows[1]["tokens_seen"]) == 2 * int(rows[0]["tokens_seen"])


def _popen(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SRC / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


def test_sigterm_and_nan_stop_every_rank_under_ddp(tmp_path):
    """SIGTERM to the launching process: both ranks stop at the same step (Lightning's
    per-step broadcast, no collective of ours), last.ckpt is saved, exit 143, and the run
    resumes to its end. A NaN loss stops both ranks with the one-line error, exit 2."""
    (tmp_path / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    common = [a for a in ARGS if "rank_probe" not in a and "max_steps" not in a]
    proc = _popen(tmp_path, "trainer=ddp_cpu", *common, "trainer.max_steps=100000")
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("step 6/") or (not line and proc.poll() is not None):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    (run,) = run_dirs(tmp_path)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] >= 6 and f"stopped at step {last['global_step']}" in err
    assert json.loads((run / "metrics.json").read_text())["status"] == "stopped"
    end = last["global_step"] + 3
    r = run_entry("train.py", f"resume={run}", f"trainer.max_steps={end}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == end

    r = run_entry(
        "train.py", "trainer=ddp_cpu", *common, "trainer.max_steps=40", "optim.lr=1e30",
        "trainer.log_every_n_steps=2", "hydra.run.dir=nan", cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert r.returncode == 2 and "error: the training loss became" in r.stderr, r.stderr[-3000:]

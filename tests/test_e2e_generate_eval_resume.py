"""End to end: checkpoints in use by the real entry points.

A run resumed in place (resume=RUN_DIR) ends bit-for-bit where an uninterrupted one does, in
the same directory; ckpt_path= continues into a new one; generate.py and eval.py work from a
run directory or a .ckpt. (What generate and evaluate compute is in test_inference.py.)

Every entry point runs in this process (tests.helpers.run_main: the same command line, Hydra
and task runner): what a separate process shows (signals, kill -9, exit codes of a process) is
in test_e2e_faults.py and test_e2e_run_directory.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import event_files_sort_in_order, make_text, run_dirs, run_main, tb_dir

pytestmark = pytest.mark.slow

COMMON = [
    "model=tiny",
    "data=text",
    "data.path=data/corpus.txt",  # in the checkout's data folder: eval.py follows it
    "data.val_batches=2",
    "trainer.val_check_interval=10",
    "optim.decay_steps=40",
    "optim.warmup_steps=5",
    "model.dropout=0.1",
    "logger=tensorboard",
    "callbacks.text_samples.max_new_tokens=20",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ckpt")
    (cwd / "data").mkdir()
    (cwd / "data" / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    return cwd


@pytest.fixture(scope="module")
def straight_run(workdir) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        args = [*COMMON, "trainer.max_steps=40", "hydra.run.dir=straight"]
        code, _, _ = run_main("train.py", *args, cwd=workdir, monkeypatch=mp)
    assert code == 0
    return workdir / "straight"


# --------------------------------------------------------------------------- resume
def test_resume_in_place_equals_straight_run(workdir, straight_run, monkeypatch, capsys):
    io = {"cwd": workdir, **io_of(monkeypatch, capsys)}
    event_files_sort_in_order()  # the two halves' event files are read as one run
    code, _, err = run_main(
        "train.py", *COMMON, "trainer.max_steps=20", "hydra.run.dir=halves", **io
    )
    assert code == 0, err[-3000:]
    half = workdir / "halves"
    assert json.loads((half / "metrics.json").read_text())["steps"] == 20
    code, _, err = run_main("train.py", f"resume={half}", "trainer.max_steps=40", **io)
    assert code == 0, err[-3000:]
    assert not run_dirs(workdir)  # no new timestamped directory: it continued in place

    a = json.loads((straight_run / "metrics.json").read_text())
    b = json.loads((half / "metrics.json").read_text())
    assert b["steps"] == 40 and b["tokens_seen"] == a["tokens_seen"]
    assert [h["step"] for h in b["history"]] == [10, 20, 30, 40]  # history survived
    assert b["val/loss"] == pytest.approx(a["val/loss"], abs=1e-6)
    wa = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    wb = torch.load(half / "checkpoints" / "last.ckpt", weights_only=True)
    assert wa["global_step"] == wb["global_step"] == 40
    for k, v in wa["state_dict"].items():
        assert torch.allclose(v, wb["state_dict"][k], atol=1e-6), k
    # same TensorBoard run: both processes' events in one folder, val/loss continues
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((half / "tensorboard").glob("*/events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(tb_dir(half))).Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20, 30, 40]
    # the composed config (recorded overrides + new ones) was kept
    cfg = OmegaConf.load(half / ".hydra" / "config.yaml")
    assert cfg.model.dropout == 0.1 and cfg.trainer.max_steps == 40


def test_resume_with_ckpt_path(workdir, straight_run, monkeypatch, capsys):
    last = straight_run / "checkpoints" / "last.ckpt"
    code, out, err = run_main(
        "train.py",
        *COMMON,
        "trainer.max_steps=50",
        f"ckpt_path={last}",
        "optim.decay_steps=50",
        "hydra.run.dir=more",
        cwd=workdir,
        **io_of(monkeypatch, capsys),
    )
    assert code == 0, err[-3000:]
    # a longer decay: from where the cool-down began (step 32 of 40), as if planned for 50
    assert "continuing from step 32, where the cool-down began" in out
    assert "step 40/50: val/loss=" in out and "step 30/50: val/loss=" not in out
    assert (
        torch.load(workdir / "more/checkpoints/last.ckpt", weights_only=True)["global_step"] == 50
    )


def test_resume_of_a_non_run_is_a_clear_error(workdir, monkeypatch, capsys):
    code, _, err = run_main(
        "train.py", f"resume={workdir}", cwd=workdir, **io_of(monkeypatch, capsys)
    )
    assert code == 2 and "not a run directory" in err


# --------------------------------------------------------------------------- generate.py, eval.py
def test_generate_entry_point(workdir, straight_run, monkeypatch, capsys):
    args = [f"ckpt={straight_run}", "prompt=JULIET:", "max_new_tokens=25"]
    code, out, err = run_main("generate.py", *args, cwd=workdir, **io_of(monkeypatch, capsys))
    assert code == 0, err
    assert out.startswith("JULIET:") and len(out.rstrip("\n")) >= len("JULIET:") + 20
    args = [f"ckpt={straight_run}", "top_k=0"]
    code, _, err = run_main("generate.py", *args, cwd=workdir, **io_of(monkeypatch, capsys))
    assert code == 2 and "top_k" in err and "Traceback" not in err


def test_eval_entry_point(workdir, straight_run, monkeypatch, capsys):
    args = [f"ckpt={straight_run}/checkpoints/last.ckpt", f"output={workdir}/e.json"]
    code, out, err = run_main("eval.py", *args, cwd=workdir, **io_of(monkeypatch, capsys))
    assert code == 0, err
    assert "val/loss=" in out and "perplexity=" in out
    assert json.loads((workdir / "e.json").read_text())["tokens"] > 0


def io_of(monkeypatch, capsys) -> dict:
    return {"monkeypatch": monkeypatch, "capsys": capsys}

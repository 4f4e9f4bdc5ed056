"""nanoforge.console: what a run prints, the progress bar's step count, warnings as lines."""

from __future__ import annotations

import io
import logging
import math
import shlex
import warnings
from types import SimpleNamespace

import pytest

from nanoforge import cli
from nanoforge.console import (
    ConsoleHandler,
    ProgressLog,
    StepProgressBar,
    corpus_prompt,
    end_of_run,
    quiet_libraries,
)


def test_resumed_bar_counts_the_whole_run_and_rates_only_this_process():
    bar = StepProgressBar(tty_only=False)
    trainer = SimpleNamespace(global_step=750, max_steps=2000)
    bar._trainer = trainer
    bar.train_progress_bar = bar.init_train_tqdm()
    bar.train_progress_bar.fp = io.StringIO()
    bar._count_steps(trainer)
    t = bar.train_progress_bar
    assert (t.n, t.total, t.initial) == (750, 2000, 750)  # 750/2000, not 750/?
    fmt = t.format_dict
    fmt["elapsed"] = 10.0
    t.n = 760
    fmt["n"] = 760
    # tqdm's average rate is (n - initial) / elapsed: 1 step/s, not 76
    assert t.format_meter(**fmt).count("1.00step/s") == 1


def test_one_bar_for_the_whole_run_and_no_frozen_line_above_the_validation_lines(monkeypatch):
    """Lightning's epoch start made a second bar, leaving the first at ``train: 0%``."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stdout", stream)
    monkeypatch.setattr("sys.stderr", stream)
    bar = StepProgressBar(tty_only=False)
    trainer = SimpleNamespace(global_step=0, max_steps=200, current_epoch=0)
    bar._trainer = trainer
    bar.on_train_start(trainer)
    first = bar.train_progress_bar
    bar.on_train_epoch_start(trainer)
    assert bar.train_progress_bar is first  # not a second bar below a frozen one
    assert (first.n, first.total) == (0, 200)
    first.close()
    assert "\n" not in stream.getvalue().rstrip("\n")  # nothing left behind above the bar


def test_the_bar_is_off_when_the_output_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert not StepProgressBar()._enabled  # a log file would fill with carriage returns
    assert StepProgressBar(tty_only=False)._enabled


def _capture(name="t"):
    stream = io.StringIO()
    handler = ConsoleHandler(stream, errors=stream)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def test_console_lines_are_plain_and_warnings_say_so():
    logger, stream = _capture()
    logger.info("step 10/20: val/loss=1.0000")
    logger.warning("disk nearly full")
    assert stream.getvalue() == "step 10/20: val/loss=1.0000\nwarning: disk nearly full\n"
    out, err = io.StringIO(), io.StringIO()
    logger.handlers[-1] = ConsoleHandler(out, errors=err)
    logger.info("progress")
    logger.error("stopped")
    assert (out.getvalue(), err.getvalue()) == ("progress\n", "error: stopped\n")


def test_library_adverts_are_dropped_and_python_warnings_become_one_line(monkeypatch):
    root_stream = io.StringIO()
    root = logging.getLogger()
    handler = ConsoleHandler(root_stream, errors=root_stream)
    monkeypatch.setattr(root, "handlers", [handler])
    # an earlier in-process run may have turned the capture on under another test's warning
    # recorder; start from off, so that it hooks the warnings module as it is now
    logging.captureWarnings(False)
    quiet_libraries()
    try:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info("💡 Tip: try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("TPU available: False, using: 0 TPU cores")  # on every CPU machine
        # a resume is one line of ours ("resuming from ... at step N"), not three
        rank_zero_info("Restoring states from the checkpoint path at run/checkpoints/last.ckpt")
        rank_zero_info("Restored all states from the checkpoint at run/checkpoints/last.ckpt")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a thing to know", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    out = root_stream.getvalue()
    assert "Tip" not in out and "TPU" not in out and "checkpoint" not in out
    assert out.count("GPU available: False, used: False") == 1
    assert "warning: a thing to know\n" in out and ".py:" not in out


@pytest.mark.parametrize("step0", [0, 50])  # fresh, and resumed at step 50
def test_progress_log_line_counts_the_steps_of_this_process(step0, monkeypatch, caplog):
    import torch

    log = ProgressLog()
    log._t0, log._step0 = 0.0, step0
    monkeypatch.setattr("time.perf_counter", lambda: 10.0)
    trainer = SimpleNamespace(
        global_step=step0 + 100,
        max_steps=step0 + 300,
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        callback_metrics={"val/loss": torch.tensor(1.5), "train/loss": torch.tensor(1.25)},
    )
    with caplog.at_level(logging.INFO, logger="nanoforge"):
        ProgressLog.on_validation_end(log, trainer, None)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        f"step {step0 + 100}/{step0 + 300}: val/loss=1.5000 train/loss=1.2500 "
        "(10.00 steps/s, ETA 20s)"
    )


def test_end_of_run_says_how_it_ended_where_it_went_and_what_to_run_next(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "logs" / "train" / "runs" / "r1"
    summary = {
        "status": "finished",
        "steps": 2000,
        "wall_seconds": 112.4,
        "train_tokens_per_sec": 18745.2,
        "val/loss": 1.80712,
        "val/bpc": 2.60713,
        "best/val/loss": 1.80001,
        "best/step": 1750,
        "best/checkpoint": str(run / "checkpoints" / "best.ckpt"),
    }
    lines = end_of_run(summary, run, "THESEUS:").splitlines()
    assert lines[0] == "run finished: 2,000 steps in 1m52s, 18,745 tokens/s"  # as the ETA
    assert "val/loss 1.8071" in lines[1] and "best val/loss 1.8000 at step 1750" in lines[1]
    assert "  run dir   logs/train/runs/r1" in lines  # relative to where the user is
    assert "  best      logs/train/runs/r1/checkpoints/best.ckpt" in lines
    assert "  python src/generate.py ckpt=logs/train/runs/r1 prompt=THESEUS:" in lines
    assert "  python src/eval.py ckpt=logs/train/runs/r1" in lines
    assert "  python src/train.py resume=logs/train/runs/r1 trainer.max_steps=4000" in lines
    assert "  tensorboard --logdir logs/train/runs/r1" in lines

    stopped = {**summary, "status": "stopped", "val/loss": math.nan, "best/checkpoint": None}
    lines = end_of_run(stopped, run).splitlines()
    assert lines[0].startswith("run stopped: 2,000 steps") and "val/loss —" in lines[1]
    assert "  python src/train.py resume=logs/train/runs/r1" in lines
    assert not any(line.startswith("  best ") for line in lines)
    # a corpus outside the data folder: eval.py is told which text (it does not follow a
    # recorded path there, test_inference.py)
    mine = end_of_run(summary, run, eval_data="data=text data.path=../elsewhere/corpus.txt")
    assert (
        "  python src/eval.py ckpt=logs/train/runs/r1 data=text data.path=../elsewhere/corpus.txt"
        in (mine.splitlines())
    )


@pytest.mark.parametrize(
    "text, prompt",
    [
        ("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n", "THESEUS:"),
        ("\n\nimport os\nimport sys\n", "import os"),
        ("def f(x): return \"a\" + 'b'  # both quotes and a long line\n", "def"),
        ("", None),
    ],
)
def test_the_generate_hint_prompts_with_the_runs_own_corpus(text, prompt, tmp_path):
    """It suggested prompt="ROMEO:" after training on Python code (issue 23)."""
    assert corpus_prompt(text) == prompt
    summary = {"status": "finished", "steps": 10, "wall_seconds": 3.0, "val/loss": 2.0}
    lines = end_of_run(summary, tmp_path, prompt).splitlines()
    (hint,) = [line for line in lines if "src/generate.py" in line]
    assert "ROMEO" not in hint
    if prompt:  # the hint's words go through the shell and the command line as they are
        argv = ["generate.py", *shlex.split(hint)[2:]]
        assert cli.check_command_line(argv, "generate")[2].strip('"') == f"prompt={prompt}"


def test_the_next_commands_keep_a_run_path_with_a_space_one_word(tmp_path, monkeypatch):
    """Under a folder with a space (a TMPDIR like "tmp dir", "My Runs/"), the printed command
    `resume=my runs/r1 trainer.max_steps=20` split into two words in the shell."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "my runs" / "r1"
    summary = {"status": "finished", "steps": 10, "wall_seconds": 3.0, "val/loss": 2.0}
    lines = end_of_run(summary, run).splitlines()
    commands = [shlex.split(line) for line in lines[lines.index("next:") + 1 :]]
    assert [c[2] for c in commands] == [
        "ckpt=my runs/r1",
        "ckpt=my runs/r1",
        "resume=my runs/r1",
        "my runs/r1",
    ]
    assert commands[2][3:] == ["trainer.max_steps=20"]

"""nanoforge.console: what a run prints, the progress bar's step count, warnings as lines."""

from __future__ import annotations

import io
import logging
import warnings
from types import SimpleNamespace

import pytest

from nanoforge.console import ConsoleHandler, ProgressLog, StepProgressBar, quiet_libraries


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
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a thing to know", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    out = root_stream.getvalue()
    assert "Tip" not in out
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

"""nanoforge.extension: a finished run extended to more steps, exactly as if it had been
planned that long.

A tiny model (dropout on, so the random state matters too) trained in-process: a run of 12
steps, extended with the command the end-of-run block prints, ends with the same weights,
bit for bit, as a run planned for 24 steps from the start; its metrics.json history,
samples.txt and TensorBoard events read as that one run. A cosine run says that an
extension re-warms it, and how to avoid it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanoforge.callbacks import end_of_run
from nanoforge.extension import BEST_AT_COOLDOWN, COOLDOWN_CKPT
from nanoforge.training import train
from tests.conftest import compose_run, make_text, tb_dir

STEPS = 12  # wsd, cooldown_frac 0.2: the cool-down of a 12-step run begins at step 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("extension") / "corpus.txt"
    path.write_text(make_text(20_000, seed=3), encoding="utf-8")
    return path


def run(root: Path, corpus: Path, steps: int, *extra: str) -> dict:
    cfg = compose_run(
        root,
        "data=text",
        f"data.path={corpus}",
        f"paths.data_dir={corpus.parent / 'data'}",
        "data.val_batches=1",
        "model.dropout=0.1",
        "optim.warmup_steps=3",
        f"trainer.max_steps={steps}",
        "callbacks.text_samples.max_new_tokens=4",
        "logger=tensorboard",
        *extra,
    )
    return train(cfg)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module", params=[4, 5], ids=["no-val-at-cooldown", "val-at-cooldown"])
def runs(request, tmp_path_factory, corpus):
    """The planned run, the extended one, its summary and its log lines, with validations
    every 4 or 5 steps: the cool-down of the 12-step run begins at step 10, where a
    validation falls when the interval is 5."""
    interval = f"trainer.val_check_interval={request.param}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a busy machine
    planned = tmp_path_factory.mktemp("planned")
    run(planned, corpus, 2 * STEPS, interval)
    extended = tmp_path_factory.mktemp("extended")
    first = run(extended, corpus, STEPS, interval)
    assert (extended / "run" / "checkpoints" / COOLDOWN_CKPT).is_file()
    hint = end_of_run(first, extended / "run").splitlines()
    (command,) = [line for line in hint if "resume=" in line]
    overrides = command.split()[3:]  # python src/train.py resume=RUN <overrides>
    assert overrides == [f"trainer.max_steps={2 * STEPS}"]
    ckpt = f"ckpt_path={extended / 'run' / 'checkpoints' / 'last.ckpt'}"
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("nanoforge")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = run(extended, corpus, STEPS, interval, ckpt, *overrides)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        torch.set_num_threads(threads)
    return SimpleNamespace(
        planned=planned / "run", extended=extended / "run", summary=summary, lines=lines
    )


def test_an_extended_run_retraces_a_run_planned_that_long(runs):
    planned, extended = runs.planned, runs.extended
    assert f"continuing from step 10, where the cool-down began ({extended}" in "\n".join(
        runs.lines
    )
    a, b = weights(planned), weights(extended)
    assert a["global_step"] == b["global_step"] == 2 * STEPS
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for x, y in zip(
        a["optimizer_states"][0]["state"].values(),
        b["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    planned_summary = json.loads((planned / "metrics.json").read_text())
    assert runs.summary["history"] == planned_summary["history"]  # one run's history
    assert runs.summary["val/loss"] == planned_summary["val/loss"]
    assert runs.summary["tokens_seen"] == planned_summary["tokens_seen"]
    assert (extended / "samples.txt").read_text() == (planned / "samples.txt").read_text()
    # the best checkpoint is the planned run's, and the files are the same
    files = sorted(p.name for p in (planned / "checkpoints").iterdir())
    assert files == sorted(p.name for p in (extended / "checkpoints").iterdir())
    assert BEST_AT_COOLDOWN in files
    best_a = torch.load(planned / "checkpoints" / "best.ckpt", weights_only=True)
    best_b = torch.load(extended / "checkpoints" / "best.ckpt", weights_only=True)
    assert best_a["global_step"] == best_b["global_step"]
    assert all(torch.equal(v, best_b["state_dict"][k]) for k, v in best_a["state_dict"].items())


def test_the_set_aside_cool_down_leaves_no_trace_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    got = EventAccumulator(str(tb_dir(runs.extended))).Reload()
    want = EventAccumulator(str(tb_dir(runs.planned))).Reload()
    assert got.Tags()["scalars"] and got.Tags()["scalars"] == want.Tags()["scalars"]
    for tag in got.Tags()["scalars"]:
        if not tag.startswith(("throughput/", "memory/")):  # timings differ, steps do not
            assert [(e.step, e.value) for e in got.Scalars(tag)] == [
                (e.step, e.value) for e in want.Scalars(tag)
            ], tag
        assert [e.step for e in got.Scalars(tag)] == [e.step for e in want.Scalars(tag)], tag
    text = "samples/text_summary"
    assert [e.step for e in got.Tensors(text)] == [e.step for e in want.Tensors(text)]

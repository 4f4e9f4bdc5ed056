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
import shlex
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanoforge.callbacks import drop_samples_after
from nanoforge.console import end_of_run
from nanoforge.extension import (
    BEST_AT_COOLDOWN,
    COOLDOWN_CKPT,
    Continuation,
    describe,
    extension_overrides,
    plan,
)
from nanoforge.optim import OptimConfig
from nanoforge.training import train
from tests.helpers import compose_run, event_files_sort_in_order, make_text, tb_dir

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
    event_files_sort_in_order()  # both runs' event files are compared, some in one second
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a busy machine
    planned = tmp_path_factory.mktemp("planned")
    run(planned, corpus, 2 * STEPS, interval)
    extended = tmp_path_factory.mktemp("extended")
    first = run(extended, corpus, STEPS, interval)
    assert (extended / "run" / "checkpoints" / COOLDOWN_CKPT).is_file()
    hint = end_of_run(first, extended / "run").splitlines()
    (command,) = [line for line in hint if "resume=" in line]
    overrides = shlex.split(command)[3:]  # python src/train.py resume=RUN <overrides>
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


# --------------------------------------------------------------------------- where a resume starts
def save_state(path: Path, step: int, max_steps: int, **optim) -> Path:
    """A checkpoint holding only what ``extension.plan`` reads: step, plan, best path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "global_step": step,
            "hyper_parameters": {"optim": asdict(OptimConfig(**optim))},
            "nanoforge_schedule": {"max_steps": max_steps, "saved_at": 0.0},
            "callbacks": {"RunCheckpoint{...}": {"best_model_path": str(path.parent / "b.ckpt")}},
        },
        path,
    )
    return path


def test_a_finished_wsd_run_continues_from_its_cool_down_start(tmp_path):
    last = save_state(tmp_path / "last.ckpt", 300, 300, warmup_steps=20)
    save_state(tmp_path / COOLDOWN_CKPT, 240, 300, warmup_steps=20)
    start = plan(last, OptimConfig(warmup_steps=20), 600)
    assert start.path == tmp_path / COOLDOWN_CKPT and start.step == 240 and start.set_aside
    assert start.message.startswith("extending the run from 300 to 600 steps: continuing from")
    assert "its cool-down from step 240 to 300 is set aside" in start.message
    # the same length again, or a run stopped before its cool-down: a plain resume
    assert plan(last, OptimConfig(warmup_steps=20), 300) == Continuation(last, 300)
    early = save_state(tmp_path / "early" / "last.ckpt", 200, 300, warmup_steps=20)
    assert plan(early, OptimConfig(warmup_steps=20), 600) == Continuation(early, 200)
    # a plan that departs before the cool-down start (a shorter run): say how the LR jumps
    stopped = save_state(tmp_path / "stopped" / "last.ckpt", 280, 300, warmup_steps=20)
    save_state(tmp_path / "stopped" / COOLDOWN_CKPT, 240, 300, warmup_steps=20)
    start = plan(stopped, OptimConfig(warmup_steps=20), 290)
    assert start.path == stopped and not start.set_aside
    assert start.warning.startswith(
        "shortening the run from 300 to 290 steps: its new schedule departs from the one it "
        "was trained with at step 233"
    )
    assert "the learning rate goes from 0.0004 to 0.000255 at step 280" in start.warning
    assert plan(last, OptimConfig(warmup_steps=20), 200) == Continuation(last, 300)  # done


def test_an_explicit_decay_length_is_extended_by_the_hint_exactly(tmp_path):
    last = save_state(tmp_path / "last.ckpt", 300, 300, decay_steps=250)
    save_state(tmp_path / COOLDOWN_CKPT, 200, 300, decay_steps=250)
    overrides = extension_overrides(describe(OptimConfig(decay_steps=250), 300), 300)
    assert overrides == ["trainer.max_steps=600", "optim.decay_steps=500"]
    start = plan(last, OptimConfig(decay_steps=500), 600)
    assert start.set_aside and start.step == 200
    # the same decay length: the LR stays at min_lr, as planned; nothing to set aside
    assert plan(last, OptimConfig(decay_steps=250), 600) == Continuation(last, 300)


def test_a_cosine_extension_says_it_re_warms_and_how_to_avoid_it(tmp_path):
    cosine = {"schedule": "cosine", "warmup_steps": 20}
    last = save_state(tmp_path / "last.ckpt", 300, 300, **cosine)
    start = plan(last, OptimConfig(**cosine), 600)
    assert start.path == last and not start.set_aside
    assert start.warning.startswith(
        "optim.schedule=cosine: extending the run from 300 to 600 steps stretches its cosine, "
        "so it re-warms: the learning rate climbs back from 0.0001 to 0.000574 at step 300"
    )
    assert "add optim.decay_steps=300" in start.warning
    # what the end-of-run block suggests does not re-warm it
    overrides = extension_overrides(describe(OptimConfig(**cosine), 300), 300)
    assert overrides == ["trainer.max_steps=600", "optim.decay_steps=300"]
    assert plan(last, OptimConfig(**cosine, decay_steps=300), 600) == Continuation(last, 300)


def test_a_run_without_a_cool_down_start_or_a_recorded_plan_resumes_as_asked(tmp_path):
    last = save_state(tmp_path / "last.ckpt", 300, 300)
    start = plan(last, OptimConfig(), 600)  # a run from before cooldown_start.ckpt
    assert start.path == last and f"no {COOLDOWN_CKPT}" in start.warning
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"global_step": 300, "hyper_parameters": {"optim": {}}}, legacy)
    assert plan(legacy, OptimConfig(), 600) == Continuation(legacy)


def test_samples_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "samples.txt"
    blocks = [f"===== step {s} =====\nline ===== step 99 =====\n\n" for s in (5, 10, 15)]
    path.write_text("".join(blocks), encoding="utf-8")
    drop_samples_after(path, 12)
    assert path.read_text(encoding="utf-8") == "".join(blocks[:2])
    drop_samples_after(path, 12)  # nothing more to drop
    drop_samples_after(tmp_path / "none.txt", 3)  # no file: nothing to do
    assert path.read_text(encoding="utf-8") == "".join(blocks[:2])


def test_the_cool_down_checkpoint_is_the_full_state_and_says_so(tmp_path):
    """Saved with weights_only unset, Lightning logs "`weights_only` was not set, defaulting
    to `False`." into the middle of the run's console at the cool-down's step."""
    from nanoforge.callbacks import RunCheckpoint

    saved = []
    callback = RunCheckpoint(dirpath=tmp_path)
    trainer = SimpleNamespace(
        max_steps=1000,
        global_step=800,  # the default schedule's cool-down begins at 80 %
        fast_dev_run=False,
        state=SimpleNamespace(fn="fit"),
        is_global_zero=False,
        save_checkpoint=lambda path, **kwargs: saved.append((Path(path).name, kwargs)),
    )
    callback._save_cooldown_start(trainer, SimpleNamespace(optim_config=OptimConfig()))
    assert saved == [(COOLDOWN_CKPT, {"weights_only": False})]

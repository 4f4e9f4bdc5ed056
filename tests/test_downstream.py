"""Downstream task scores during training (nanoforge.downstream): ``callbacks=downstream``
logs ``eval/<task>/<metric>`` to TensorBoard and metrics.json, and a sweep ranks by it."""

import json
import os

import pytest

from nanoforge.errors import UserError
from tests.harness_tasks import TEXT, write_tasks
from tests.helpers import compose_run, make_text, run_main, tb_dir

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tasks_path(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _train(root, *overrides):
    """A tiny 4-step run under ``root/run``, validating at steps 2 and 4; its metrics.json."""
    from nanoforge.training import build

    root.mkdir()
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(6_000) + TEXT, encoding="utf-8")
    cfg = compose_run(
        root,
        "data=text",
        f"data.path={corpus}",
        "data.val_batches=1",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "callbacks.text_samples.max_new_tokens=0",
        *overrides,
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return json.loads((root / "run" / "metrics.json").read_text())


def test_scores_are_logged_to_tensorboard_and_metrics_json(tasks_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = _train(
        tmp_path / "scored",
        "logger=tensorboard",
        "callbacks=downstream",
        "callbacks.downstream.tasks=[tiny_mc]",
        f"callbacks.downstream.tasks_path={tasks_path}",
        "callbacks.downstream.limit=3",
        "callbacks.downstream.every=2",
    )
    run = tmp_path / "scored" / "run"
    assert 0.0 <= metrics["eval/tiny_mc/acc_norm"] <= 1.0 and "eval/tiny_mc/acc" in metrics
    # scored at the 2nd validation (every=2) only: step 4, not step 2
    assert [h["step"] for h in metrics["history"] if "eval/tiny_mc/acc" in h] == [4]
    events = EventAccumulator(str(tb_dir(run)))
    events.Reload()
    (point,) = events.Scalars("eval/tiny_mc/acc_norm")
    assert point.step == 4 and point.value == pytest.approx(metrics["eval/tiny_mc/acc_norm"])
    # scoring leaves training's random state alone: the same losses as a run without it
    plain = _train(tmp_path / "plain", "logger=none")
    assert [h["val/loss"] for h in plain["history"]] == [h["val/loss"] for h in metrics["history"]]


def test_a_bad_setting_stops_before_training(tasks_path):
    from nanoforge.downstream import DownstreamEval

    with pytest.raises(UserError, match="every must be"):
        DownstreamEval(tasks=["tiny_mc"], tasks_path=str(tasks_path), every=0)
    with pytest.raises(UserError, match="holds no task YAML"):
        DownstreamEval(tasks=["tiny_mc"], tasks_path=str(tasks_path / "cache"))


@pytest.mark.slow
def test_a_sweep_ranks_jobs_by_a_downstream_score(tmp_path, tasks_path, monkeypatch, capsys):
    """The real entry point's Optuna sweep, in this process (tests.helpers.run_main: Hydra's
    basic launcher runs the jobs in the sweep's process anyway)."""
    from omegaconf import OmegaConf

    from nanoforge import report

    (tmp_path / "corpus.txt").write_text(make_text(6_000) + TEXT, encoding="utf-8")
    code, out, err = run_main(
        "train.py",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.storage=null",
        "optim.lr=choice(0.001,0.01)",
        "optimized_metric=eval/tiny_mc/acc_norm",
        "model=tiny",
        "data=text",
        "data.path=corpus.txt",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "data.val_batches=1",
        "logger=none",
        "callbacks.text_samples.max_new_tokens=0",
        "callbacks=downstream",
        "callbacks.downstream.tasks=[tiny_mc]",
        f"callbacks.downstream.tasks_path={tasks_path}",
        "callbacks.downstream.limit=4",
        cwd=tmp_path,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 0, out[-2000:] + err[-3000:]
    (sweep,) = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*"))
    values = []
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        status = json.loads((sweep / job / report.STATUS_FILE).read_text())
        assert status == {"status": "ok", "value": metrics["eval/tiny_mc/acc_norm"]}
        values.append(status["value"])
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == max(values)


def test_scoring_during_training_prints_nothing(tasks_path, tmp_path, monkeypatch, capfd):
    """The scores go to the loggers; the console keeps the run's own lines: no harness progress
    bar and no ``fatal: not a git repository`` (the harness asks git for a commit) at each
    scoring when the run starts outside a git checkout."""
    from types import SimpleNamespace

    import torch

    from nanoforge.downstream import DownstreamEval
    from nanoforge.model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2))
    module = SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    callback = DownstreamEval(tasks=["tiny_mc"], tasks_path=str(tasks_path), limit=2)
    monkeypatch.chdir(tmp_path)  # not a git checkout
    capfd.readouterr()
    assert "eval/tiny_mc/acc" in callback.score(module)
    out, err = capfd.readouterr()
    assert out == "" and err == ""

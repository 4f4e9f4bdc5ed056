"""nanoforge.loggers: TensorBoard runs named by their overrides, the HPARAMS tab, no epoch."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from nanoforge.loggers import TensorBoard, _swept_keys, existing_version, run_hparams, run_name


def test_run_name_carries_what_the_run_trains_not_where_it_is_kept():
    overrides = ["model=tiny", "optim.lr=0.003", "paths.log_dir=/x/y", "hydra.run.dir=R"]
    assert run_name(overrides) == "model=tiny,optim.lr=0.003"
    assert run_name(["ckpt_path=a/b.ckpt", "overwrite=true"]) == "default"
    assert run_name(["data.path=corpora/my text.txt"]) == "data.path=corpora_my_text.txt"
    assert len(run_name([f"+k{i}=v" for i in range(100)], max_len=40)) == 40


def test_a_resumed_run_writes_on_in_the_folder_it_started(tmp_path):
    assert existing_version(tmp_path) is None
    (tmp_path / "optim.lr=0.001").mkdir()
    (tmp_path / "optim.lr=0.001" / "events.out.tfevents.1.host").write_bytes(b"")
    assert existing_version(tmp_path) == "optim.lr=0.001"
    (tmp_path / "events.out.tfevents.2.host").write_bytes(b"")  # an old run, unnamed
    assert existing_version(tmp_path) == ""
    logger = TensorBoard(str(tmp_path.parent), name=tmp_path.name)
    assert logger.version == ""


def test_a_sweep_job_is_named_by_what_the_sweep_varies_first(tmp_path):
    from omegaconf import OmegaConf

    multirun = tmp_path / "multirun.yaml"
    sweep = ["model=tiny", "optim.lr=1e-3,3e-3", "trainer.max_steps=100"]
    OmegaConf.save({"hydra": {"overrides": {"task": sweep}}}, multirun)
    job = ["model=tiny", "optim.lr=0.003", "trainer.max_steps=100"]
    assert _swept_keys(multirun, job) == ["optim.lr"]
    assert _swept_keys(tmp_path / "missing.yaml", job) == []


def test_hparams_columns_are_the_overrides_typed():
    columns = run_hparams(["optim.lr=3e-3", "model=tiny", "compile=true", "paths.log_dir=x"])
    assert columns == {"optim.lr": 0.003, "model": "tiny", "compile": True}


def test_hparams_tab_lists_settings_and_val_loss_and_epoch_is_not_logged(tmp_path, monkeypatch):
    monkeypatch.setattr("nanoforge.loggers._hydra_overrides", lambda: ["optim.lr=1e-3"])
    logger = TensorBoard(str(tmp_path), version="optim.lr=0.001")
    logger.log_hyperparams(
        {"optim": {"lr": 1e-3}, "model": {"n_layer": 2}, "tokenizer": {"chars": list("ab")}}
    )
    logger.log_metrics({"val/loss": 2.5, "epoch": 0}, step=10)
    logger.finalize("success")
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "optim.lr=0.001")).Reload()
    assert acc.Tags()["scalars"] == ["val/loss"]  # no epoch card, no fake hp_metric
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert [m.name.tag for m in experiment.experiment.metric_infos] == ["val/loss", "val/bpc"]
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert dict(session.hparams) == {"optim.lr": session.hparams["optim.lr"]}
    assert session.hparams["optim.lr"].number_value == 1e-3
    saved = (tmp_path / "tensorboard" / "optim.lr=0.001" / "hparams.yaml").read_text()
    assert "n_layer: 2" in saved and "tokenizer" not in saved  # the whole config, but no vocab

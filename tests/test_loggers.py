"""nanoforge.loggers: TensorBoard runs named by their overrides, the HPARAMS tab, no epoch.

``logger=mlflow`` and ``logger=wandb``, alone or beside TensorBoard.

Each tracker receives the metrics, the hyperparameters (with the overrides, without the
tokenizer) and the text samples; ``resume`` continues the same tracker run (its id is kept in
``RUN/trackers.json``); a missing package is a one-line error naming the extra. Offline: MLflow
writes a SQLite store under the log root, W&B an offline run in the run directory.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from nanoforge.errors import UserError
from nanoforge.loggers import TensorBoard, _swept_keys, existing_version, run_hparams, run_name
from nanoforge.training import build, train
from tests.helpers import compose_run


def test_run_name_carries_what_the_run_trains_not_where_it_is_kept():
    overrides = ["model=tiny", "optim.lr=0.003", "paths.log_dir=/x/y", "hydra.run.dir=R"]
    assert run_name(overrides) == "model=tiny,optim.lr=0.003"
    assert run_name(["ckpt_path=a/b.ckpt", "overwrite=true"]) == "default"
    assert run_name(["data.path=corpora/my text.txt"]) == "data.path=corpora_my_text.txt"
    assert len(run_name([f"+k{i}=v" for i in range(100)], max_len=40)) == 40


@pytest.mark.parametrize(
    "override",
    ["+a=$_x", "+a=$X/b", "+a=${oc.env:X}", "+a=~/b", "+a=../../b", "+a=\\..\\x", "+a=%X%", ".."],
)
def test_a_run_name_is_a_folder_name_no_library_can_move(tmp_path, monkeypatch, override):
    """No `$`, `~`, path separator, `..` or leading dot: TensorBoard's logger expands `$VAR`
    and `~` in its folder (`$_` is the shell's last command), and neither a name nor a `$NAME`
    in the run directory itself sends the events to another folder."""
    monkeypatch.setenv("_", "/usr/bin/make")
    monkeypatch.setenv("X", str(tmp_path / "elsewhere"))
    name = run_name([override, "model=tiny"])
    assert not set(name) & set("$~/\\%") and ".." not in name and not name.startswith(".")
    assert "model=tiny" in name
    run_dir = tmp_path / "run$X"
    logger = TensorBoard(str(run_dir), version=name)
    assert Path(logger.log_dir) == run_dir / "tensorboard" / name
    logger.log_metrics({"val/loss": 1.0}, step=1)
    logger.finalize("success")
    assert [p.parent for p in tmp_path.rglob("events.out.tfevents.*")] == [Path(logger.log_dir)]


def test_a_sweep_job_name_shows_an_interpolation_as_written():
    """Hydra records `+x=${paths.output_dir}` in a sweep job as `+x=$\\{paths.output_dir\\}`."""
    job = ["+out=$\\{paths.output_dir\\}", "model=tiny"]
    assert run_name(job) == "+out={paths.output_dir},model=tiny"


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


def tiny(root: Path, text_file: Path, *overrides: str):
    """4 steps validating at 2 and 4, a 20-character sample at each validation."""
    return compose_run(
        root,
        "data=text",
        f"data.path={text_file}",
        "data.val_batches=1",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "callbacks.text_samples.max_new_tokens=20",
        *overrides,
    )


def resumed(root: Path, text_file: Path, *overrides: str):
    """The same run continued from its last.ckpt to step 6, in its own directory."""
    last = root / "run" / "checkpoints" / "last.ckpt"
    return tiny(root, text_file, "trainer.max_steps=6", f"ckpt_path={last}", *overrides)


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once (MLflow's schema migration takes seconds);
    tests copy it to where their runs expect ``mlflow.db``."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def store(migrated_store: Path, folder: Path) -> str:
    """A fresh copy of the migrated store as ``folder/mlflow.db``; its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def test_logger_configs_combine_with_tensorboard():
    from tests.helpers import compose

    assert list(compose([]).logger) == ["tensorboard"]  # the default is unchanged
    cfg = compose(["logger=[tensorboard,mlflow,wandb]", "paths.log_dir=LOGS"])
    assert list(cfg.logger) == ["tensorboard", "mlflow", "wandb"]
    assert cfg.logger.mlflow.tracking_uri == "sqlite:///LOGS/mlflow.db"  # under the log root
    assert cfg.logger.wandb.offline is True


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_missing_package_is_one_line_naming_the_extra(
    cfg_factory, text_file, monkeypatch, tracker
):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import <tracker>` fails, in this test
    with pytest.raises(
        UserError, match=rf'needs the {tracker} package.*pip install -e "\.\[{tracker}\]"'
    ):
        build(cfg_factory("data=text", f"data.path={text_file}", f"logger={tracker}"))


def test_mlflow_gets_params_metrics_and_samples_and_a_resume_continues_its_run(
    tmp_path, text_file, one_thread, migrated_store
):
    from mlflow.tracking import MlflowClient

    store(migrated_store, tmp_path / "logs")
    train(tiny(tmp_path, text_file, "logger=[tensorboard,mlflow]"))
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert record["tracking_uri"] == f"sqlite:///{tmp_path}/logs/mlflow.db"
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model/n_layer"] == "2" and run.data.params["optim/lr"] == "0.001"
    assert "overrides" in run.data.params
    assert not any(k.startswith("tokenizer/") for k in run.data.params)
    assert run.data.tags["run_dir"] == str(run_dir)
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in history] == [2, 4]
    assert "epoch" not in run.data.metrics
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/step_000002.txt", "samples/step_000004.txt"]
    text = Path(client.download_artifacts(run.info.run_id, samples[-1], str(tmp_path)))
    assert text.read_text() in (run_dir / "samples.txt").read_text()
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))  # TensorBoard too

    # resumed from another working directory (another log root): the run's own store
    elsewhere = f"paths.log_dir={tmp_path / 'elsewhere' / 'logs'}"
    train(resumed(tmp_path, text_file, "logger=[tensorboard,mlflow]", elsewhere))
    assert not (tmp_path / "elsewhere" / "logs" / "mlflow.db").exists()
    again = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert again["run_id"] == record["run_id"]  # the same MLflow run, continued
    experiment = client.get_experiment_by_name("nanoforge-train")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    history = client.get_metric_history(record["run_id"], "val/loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert len(client.list_artifacts(record["run_id"], "samples")) == 3

    # a new run in a new directory (no checkpoint to resume) is a new MLflow run
    other = tmp_path / "other"
    other.mkdir()
    train(tiny(other, text_file, "logger=mlflow", f"paths.log_dir={tmp_path}/logs"))
    assert len(client.search_runs([experiment.experiment_id])) == 2


@pytest.mark.parametrize("content", ["{garbled", "[]", '{"mlflow": "abc"}'])
def test_an_unreadable_trackers_json_stops_a_resume_in_one_line(tmp_path, content):
    """Continuing would silently start a new MLflow run beside the recorded one."""
    pytest.importorskip("mlflow")
    from nanoforge.loggers import MLflow

    (tmp_path / "trackers.json").write_text(content)
    with pytest.raises(UserError, match=r"trackers.json is not the record .* delete it"):
        MLflow(str(tmp_path), tracking_uri=f"sqlite:///{tmp_path}/x.db", resume_from="x")


def test_the_mlflow_store_is_recorded_absolute_and_a_foreign_store_is_named(
    tmp_path, migrated_store, monkeypatch
):
    from nanoforge.loggers import MLflow, absolute_uri

    monkeypatch.chdir(tmp_path)
    store(migrated_store, tmp_path / "s")
    logger = MLflow(str(tmp_path / "run"), tracking_uri="sqlite:///s/mlflow.db")
    run_id = logger.run_id
    record = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    assert record == {"run_id": run_id, "tracking_uri": f"sqlite:///{tmp_path}/s/mlflow.db"}
    assert absolute_uri("./mlruns") == str(tmp_path / "mlruns")
    assert absolute_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("http://host:5000") == "http://host:5000"
    # a store that does not hold the run (a server, a file elsewhere) is never used unasked
    data = {"mlflow": {"run_id": run_id, "tracking_uri": "http://example.invalid"}}
    (tmp_path / "run" / "trackers.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="pass logger.mlflow.tracking_uri=http://example"):
        MLflow(str(tmp_path / "run"), tracking_uri="sqlite:///s/mlflow.db", resume_from="x")


def wandb_records(run_dir: Path, runs: int = 1, timeout: float = 30.0) -> list:
    """The records of the offline W&B runs in ``run_dir``, once ``runs`` run records are there:
    wandb's service process may still be flushing its log when ``finish()`` has returned."""
    deadline, before = time.time() + timeout, -1
    while True:
        records = _wandb_records(run_dir)
        found = sum(r.WhichOneof("record_type") == "run" for r in records)
        settled = len(records) == before  # nothing more written in the last 0.3 s
        if (found >= runs and settled) or time.time() > deadline:
            return records
        before = len(records)
        time.sleep(0.3)


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of the offline W&B runs in ``run_dir`` (``wandb sync`` uploads
    these), read from their LevelDB-style log (wandb 0.31 has no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, block, chunk = path.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = block - pos % block
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
                pos += left
                continue
            chunk += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
    return records


def test_wandb_offline_gets_history_config_and_samples_and_a_resume_continues_its_run(
    tmp_path, text_file, one_thread, monkeypatch
):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, whatever the config says
    monkeypatch.setenv("WANDB_CONSOLE", "off")

    train(tiny(tmp_path, text_file, "logger=[tensorboard,wandb]", "tags=[smoke]"))
    run_dir = tmp_path / "run"
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    records = wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.project == "nanoforge" and list(run.tags) == ["smoke"]
    config = {
        i.key or "/".join(i.nested_key): json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for i in r.config.update
    }
    assert config["model"]["n_layer"] == 2 and config["optim"]["lr"] == 0.001  # nested
    assert "overrides" in config and not any(k == "tokenizer" for k in config)

    def history(records) -> list[dict]:
        return [
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]

    rows = history(records)
    assert [h["trainer/global_step"] for h in rows if "val/loss" in h] == [2, 4]
    tables = [h for h in rows if "samples/_type" in h]
    assert [t["samples/nrows"] for t in tables] == [1, 2]  # every sample so far, as a Table
    files = next(run_dir.glob("wandb/offline-run-*")) / "files"
    table = json.loads((files / tables[-1]["samples/path"]).read_text())
    assert table["columns"] == ["step", "text"] and [r[0] for r in table["data"]] == [2, 4]

    # wandb names an offline run folder by the second it starts (and the id): a resume within
    # the same second, which only a test is fast enough for, would write into the first one
    time.sleep(1.1)
    train(resumed(tmp_path, text_file, "logger=[tensorboard,wandb]", "tags=[smoke]"))
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"] == run_id
    later = wandb_records(run_dir, runs=2)
    runs = [r.run for r in later if r.WhichOneof("record_type") == "run"]
    assert [r.run_id for r in runs] == [run_id, run_id]  # two offline pieces of one W&B run
    rows = history(later)
    assert [h["trainer/global_step"] for h in rows if "val/loss" in h] == [2, 4, 6]
    # the samples before the resume travel in the checkpoint: the table still has them all
    assert [h["samples/nrows"] for h in rows if "samples/_type" in h] == [1, 2, 3]


def test_mlflow_marks_a_run_stopped_by_a_signal_killed_and_a_crashed_one_failed(
    tmp_path, migrated_store
):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from nanoforge.loggers import MLflow

    uri = store(migrated_store, tmp_path)

    def status_after(error: BaseException) -> str:
        run_dir = tmp_path / type(error).__name__
        logger = MLflow(str(run_dir), tracking_uri=uri)
        run_id = logger.run_id  # the run exists from the first use on
        try:
            raise error
        except BaseException:  # SIGTERMException is a SystemExit
            logger.finalize("failed")  # what Lightning does when fit ends in an exception
        return logger.experiment.get_run(run_id).info.status

    assert status_after(SIGTERMException()) == "KILLED"  # resumable: resume=RUN_DIR
    assert status_after(RuntimeError("boom")) == "FAILED"

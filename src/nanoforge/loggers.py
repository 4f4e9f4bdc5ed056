"""The experiment trackers, as Lightning loggers configured in ``configs/logger/``.

TensorBoard is Lightning's ``TensorBoardLogger`` with three changes, so that
``tensorboard --logdir logs`` compares runs at a glance:

- **run names carry the overrides**: events go to ``RUN/tensorboard/<overrides>/`` (e.g.
  ``…/multiruns/<time>/0/tensorboard/optim.lr=0.001``), so the jobs of a sweep are told apart
  in the run selector; a resumed run writes on in the folder it started;
- **the HPARAMS tab** lists every run with its overrides as columns (``optim.lr``, ...) and
  ``val/loss`` (and ``val/bpc``), TensorBoard's own way to compare sweep jobs, without a
  fake metric value at step 0 (the whole config stays in hparams.yaml and ``.hydra/``);
- **no ``epoch`` card**: the training stream is one endless epoch, and Lightning's ``epoch``
  scalar was the flat first card of the Time Series tab.

MLflow and Weights & Biases are Lightning loggers too (``configs/logger/mlflow.yaml``,
``configs/logger/wandb.yaml``), each combinable with TensorBoard: ``logger=[tensorboard,mlflow]``.

Lightning's ``MLFlowLogger`` and ``WandbLogger`` do the logging; what they get here:

- **the run's id is kept in the run directory** (``RUN/trackers.json``), so ``resume=RUN_DIR``
  continues the same MLflow / W&B run instead of starting a new one;
- **hyperparameters as each tracker shows them**: the model, optim and data settings and the
  command-line overrides (``overrides``), without the tokenizer's vocabulary; MLflow params
  cannot change, so a setting changed on resume is recorded as a tag ``resumed.<key>``;
- **text samples** (``TextSamples``): an MLflow text artifact per validation
  (``samples/step_000500.txt``, the Artifacts tab), a W&B Table ``samples`` (step, text);
- **a one-line error naming the extra** when the package is missing
  (``pip install -e ".[mlflow]"``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import secrets
import string
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from nanoforge import overrides as ov
from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes, read_json

# overrides that say where or how a run is kept, not what it trains: left out of its name
_NOT_IN_NAME = (
    "hydra.", "hydra/", "paths.", "ckpt_path", "overwrite", "print_config", "resume", "logger"
)  # fmt: skip


def overrides(given: list[str] | None = None) -> list[str]:
    """The command-line overrides (``given``, or this run's from Hydra, the swept keys first
    in a sweep) minus the ones that say where or how a run is kept: what tells runs apart."""
    given = _hydra_overrides() if given is None else given
    return [o for o in given if not ov.key(o).startswith(_NOT_IN_NAME)]


# what a run name keeps: letters and digits (any script), and ``_.,=+-@[]{}()``; anything else
# becomes ``_``: a path separator would nest the run a level down, and TensorBoard's logger
# runs os.path.expandvars/expanduser on its folder (``$_``, ``$HOME``, ``~`` would move it)
_UNSAFE = re.compile(r"[^\w.,=+\-@\[\]{}()]+")


def run_name(given: list[str] | None = None, max_len: int = 120) -> str:
    """A readable TensorBoard run name from the command-line overrides (Hydra's, by default):
    ``model=tiny,optim.lr=0.001``; ``default`` for a run with none. Safe as a folder name for
    any library: no ``$``, ``~``, path separator, ``..`` or leading dot."""
    # Hydra escapes an interpolation in a sweep job's overrides (x=$\{paths.output_dir\}):
    # the name shows it as written, without the `$` (x={paths.output_dir})
    name = ",".join(re.sub(r"\\(?=\W)|\$", "", o) for o in overrides(given))
    name = _UNSAFE.sub("_", name)
    name = re.sub(r"\.{2,}", ".", name).lstrip(".") or "default"
    return name if len(name) <= max_len else name[: max_len - 1] + "…"


def _hydra_overrides() -> list[str]:
    """This job's command-line overrides; in a sweep, the keys the sweep varies come first, so
    the start of a (possibly cut) run name tells the jobs apart."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        return overrides
    varied = set(_swept_keys(Path(hc.sweep.dir) / "multirun.yaml", overrides))
    varied |= {str(k) for k in (hc.sweeper.get("params") or {})}  # Optuna's search space
    first = [o for o in overrides if ov.key(o) in varied]
    return first + [o for o in overrides if ov.key(o) not in varied]


def _swept_keys(multirun_yaml: Path, job_overrides: list[str]) -> list[str]:
    """Keys whose sweep command-line value differs from the job's own (``lr=1e-3,3e-3``)."""
    from omegaconf import OmegaConf

    try:
        task = OmegaConf.load(multirun_yaml).hydra.overrides.task
        sweep = [str(o) for o in OmegaConf.to_container(task)]  # as written, unresolved
    except Exception:  # no file (a launcher that writes none): no order to improve
        return []
    return [ov.key(o) for o in sweep if o not in job_overrides]


def run_hparams(given: list[str] | None = None) -> dict[str, bool | int | float | str]:
    """The HPARAMS tab's columns: each override as ``key: value`` (numbers as numbers), the
    settings that tell runs apart; the whole config is in hparams.yaml and .hydra/."""
    columns: dict[str, bool | int | float | str] = {}
    for o in overrides(given):
        key = ov.key(o)
        if "=" not in o:
            continue
        value = o.split("=", 1)[1]
        for parse in (int, float):
            try:
                columns[key] = parse(value)
                break
            except ValueError:
                continue
        else:
            columns[key] = {"true": True, "false": False}.get(value.lower(), value)
    return columns


def existing_version(folder: Path) -> str | None:
    """The run folder a resumed run keeps writing to: the one under ``folder`` holding event
    files, or ``""`` for runs from before named folders (events directly in ``folder``)."""
    if any(folder.glob("events.out.tfevents.*")):
        return ""
    runs = sorted(p.name for p in folder.glob("*") if any(p.glob("events.out.tfevents.*")))
    return runs[0] if len(runs) == 1 else None


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger with named runs, the HPARAMS tab and no ``epoch`` card."""

    def __init__(
        self,
        save_dir: str,
        name: str = "tensorboard",
        version: str | None = None,
        metrics: tuple[str, ...] = ("val/loss", "val/bpc"),
        **kwargs,
    ):
        if version is None:
            found = existing_version(Path(save_dir) / name)
            version = found if found is not None else run_name()
        kwargs["default_hp_metric"] = False  # no fake hp_metric scalar at step 0
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self.metric_tags = tuple(metrics)

    @property
    def log_dir(self) -> str:
        """``<save_dir>/<name>/<version>`` as given: Lightning's own runs os.path.expandvars
        and expanduser on it, so a ``$NAME`` in the run directory (``hydra.run.dir=out/$X``,
        quoted from the shell) would send the events to another folder."""
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        parts = [self.root_dir, version, *([self.sub_dir] if isinstance(self.sub_dir, str) else [])]
        return os.path.join(*parts)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None) -> None:
        """Every setting into hparams.yaml; the overrides, as columns, into the HPARAMS tab
        with the metric *tags* it reads from the run's own scalars (val/loss, val/bpc)."""
        from lightning.fabric.utilities.logger import _convert_params
        from torch.utils.tensorboard.summary import hparams

        params = _convert_params(params) or {}
        params = {k: v for k, v in params.items() if k != "tokenizer"}  # its vocabulary
        super().log_hyperparams(params)  # hparams.yaml (no summary: default_hp_metric=False)
        columns = run_hparams() or {"overrides": "default"}
        exp, ssi, sei = hparams(columns, dict.fromkeys(self.metric_tags, 0.0))
        writer = self.experiment._get_file_writer()
        for summary in (exp, ssi, sei):
            writer.add_summary(summary)


RECORD = "trackers.json"  # RUN/trackers.json: {"mlflow": {"run_id": ...}, "wandb": {"id": ...}}


def require(module: str, extra: str, logger: str) -> None:
    """Import ``module`` or stop with one line that names the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"logger={logger} needs the {module} package, which is not installed: "
            f'pip install -e ".[{extra}]"'
        ) from None


def default_run_name(run_dir: str | Path) -> str:
    """``<run dir name> <overrides>``: the time it started, then what it changed."""
    return " ".join([Path(run_dir).name, *overrides()])[:250]


def recorded(run_dir: str | Path, tracker: str) -> dict:
    """What ``RUN/trackers.json`` holds for ``tracker`` ({} when there is no file). A file
    that is there but unreadable stops the run: continuing would silently start a new
    tracker run beside the one the run directory had."""
    path = Path(run_dir) / RECORD
    if not path.exists():
        return {}
    data = read_json(path)
    entry = data.get(tracker, {}) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        raise UserError(
            f"{path} is not the record of this run's trackers (not a JSON object of tracker "
            f"runs), so the {tracker} run to continue is unknown: fix the file, or delete it "
            f"to start a new {tracker} run"
        )
    return entry


def absolute_uri(uri: str) -> str:
    """A tracking URI that names the same store from any working directory: a SQLite file, a
    ``file:`` URI or a plain path made absolute; a server's URL as it is."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if path and not path.startswith(":memory:"):
            return f"sqlite:///{Path(path).expanduser().resolve()}"
        return uri
    if uri.startswith("file:"):
        path = uri.removeprefix("file://") if uri.startswith("file://") else uri[5:]
        return Path(path).expanduser().resolve().as_uri()
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return str(Path(uri).expanduser().resolve())  # MLflow's plain-path file store
    return uri


def _store_holds_run(uri: str, run_id: str) -> bool:
    """True when ``uri`` is a local MLflow SQLite store that holds the run ``run_id`` (read
    only: a path a run directory names is checked, never written, before it is used)."""
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if path is None or not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
            return row is not None
    except sqlite3.Error:
        return False


def record(run_dir: str | Path, tracker: str, **values: Any) -> None:
    path = Path(run_dir) / RECORD
    data = read_json(path) or {}
    data[tracker] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _params(params: Any, flat: bool = True) -> dict:
    """Lightning's hyperparameters (module + datamodule) without the tokenizer (its vocabulary
    is data, not a setting), plus the run's overrides; ``flat``: ``{"model/n_layer": 6}``
    (MLflow's flat params), else nested (W&B's config)."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    params = {k: v for k, v in (_convert_params(params) or {}).items() if k != "tokenizer"}
    params["overrides"] = " ".join(overrides()) or "none"
    return _flatten_dict(params) if flat else params


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """Hold ``<db>.lock`` (a SQLite store's) while the store may be created or an experiment
    added: parallel sweep jobs starting on a new store otherwise race in MLflow's schema
    migration or in creating the same experiment (both fail with a traceback)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(tracking_uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _stopped_by_signal() -> bool:
    """True inside Lightning's exception handling of a graceful stop (SIGTERM / Ctrl-C)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(sys.exc_info()[1], SIGTERMException)


class MLflow(MLFlowLogger):
    """Lightning's MLFlowLogger; the run continues on resume (``RUN/trackers.json``).

    ``tracking_uri``: ``sqlite:///…/mlflow.db`` by default (MLflow 3's own default store; the
    ``./mlruns`` file store is in maintenance mode there), or any MLflow server.
    """

    def __init__(
        self,
        run_dir: str,
        tracking_uri: str,
        experiment_name: str = "nanoforge",
        run_name: str | None = None,
        artifact_location: str | None = None,
        resume_from: str | None = None,
        tags: dict | None = None,
        **kwargs,
    ):
        require("mlflow", "mlflow", "mlflow")
        if tracking_uri.startswith("sqlite:"):
            require("sqlalchemy", "mlflow", "mlflow")  # mlflow-skinny alone lacks it
            require("alembic", "mlflow", "mlflow")
            # "Creating initial MLflow database tables": once per log root, not news
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.run_dir = Path(run_dir)
        tracking_uri = absolute_uri(tracking_uri)
        # continue the recorded run only when this run resumes from a checkpoint
        record = recorded(run_dir, "mlflow") if resume_from else {}
        run_id = record.get("run_id")
        store = absolute_uri(str(record.get("tracking_uri") or tracking_uri))
        if run_id and store != tracking_uri:
            tracking_uri = self._store_of(run_id, store, tracking_uri)
        self.resumed = run_id is not None
        tags = {**(tags or {}), "run_dir": str(self.run_dir)}
        with store_lock(tracking_uri):
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name or default_run_name(run_dir),
                tracking_uri=tracking_uri,
                tags=tags,
                artifact_location=artifact_location,
                run_id=run_id,
                **kwargs,
            )

    def _store_of(self, run_id: str, store: str, configured: str) -> str:
        """The store to continue the recorded run in: the one it was recorded in (a resume
        from another working directory composes another log root), when that is a local
        SQLite store holding the run; else one line naming the key to pass."""
        if _store_holds_run(store, run_id):
            if rank_zero_only.rank == 0:
                print(f"MLflow: continuing run {run_id} in {store}", file=sys.stderr, flush=True)
            return store
        raise UserError(
            f"the MLflow run {run_id} of {self.run_dir} is recorded in {store}, not in this "
            f"run's store {configured}: to continue it, pass logger.mlflow.tracking_uri={store}"
            f" (or delete {self.run_dir / RECORD} to start a new MLflow run)"
        )

    @property
    @rank_zero_experiment
    def experiment(self):
        first = not self._initialized
        if first and self._run_id is None and self._experiment_id is None:
            with store_lock(self._tracking_uri):
                self._experiment_id = self._find_or_create_experiment()
        client = super().experiment
        if first:
            record(self.run_dir, "mlflow", run_id=self._run_id, tracking_uri=self._tracking_uri)
            if self.resumed:  # a resumed run is running again
                client.update_run(self._run_id, status="RUNNING")
        return client

    def _find_or_create_experiment(self) -> str:
        """Lightning's lookup, without its warning on the (normal) first run of a store."""
        found = self._mlflow_client.get_experiment_by_name(self._experiment_name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        return self._mlflow_client.create_experiment(
            self._experiment_name, artifact_location=self._artifact_location
        )

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        from mlflow.entities import Param, RunTag

        flat = {k: str(v)[:6000] for k, v in _params(params).items()}
        before = self.experiment.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in before]
        # MLflow params are immutable: a setting changed on resume becomes a tag
        changed = [RunTag(f"resumed.{k}", v) for k, v in flat.items() if before.get(k, v) != v]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            self.experiment.log_batch(self.run_id, params=new[i : i + 100])
        if changed:
            self.experiment.log_batch(self.run_id, tags=changed)

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def log_samples(self, samples: list[tuple[int, str]]) -> None:
        """The newest sample, as the text artifact ``samples/step_<step>.txt``."""
        step, text = samples[-1]
        self.experiment.log_text(self.run_id, text, f"samples/step_{step:06d}.txt")

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if status == "failed" and _stopped_by_signal():
            status = "KILLED"  # stopped by SIGTERM / Ctrl-C: resumable, not failed
        super().finalize(status)


def _wandb_id() -> str:
    """A new W&B run id (8 lowercase letters and digits, as wandb makes them); from the OS's
    randomness, so a seeded run never repeats another run's id."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class Wandb(WandbLogger):
    """Lightning's WandbLogger, offline by default (``wandb sync RUN/wandb/offline-run-*``
    uploads later); the run continues on resume (``RUN/trackers.json``)."""

    def __init__(
        self,
        run_dir: str,
        project: str = "nanoforge",
        name: str | None = None,
        offline: bool = True,
        resume_from: str | None = None,
        tags: list | None = None,
        **kwargs,
    ):
        require("wandb", "wandb", "wandb")
        self.run_dir = Path(run_dir)
        run_id = recorded(run_dir, "wandb").get("id") if resume_from else None
        run_id = run_id or _wandb_id()
        if "settings" not in kwargs:  # wandb's start and end banners: a line or two, not 20
            import wandb

            kwargs["settings"] = wandb.Settings(quiet=True)
        if rank_zero_only.rank == 0:
            record(run_dir, "wandb", id=run_id, project=project)
        super().__init__(
            name=name or default_run_name(run_dir),
            save_dir=str(run_dir),
            offline=offline,
            id=run_id,
            project=project,
            tags=list(tags or []) or None,
            resume="allow",
            **kwargs,
        )

    @property
    @rank_zero_experiment
    def experiment(self):
        # Lightning always passes `anonymous`, which wandb >= 0.19 warns about on every run
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        return super().experiment

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        super().log_hyperparams(_params(params, flat=False))  # wandb.config.model.n_layer

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def log_samples(self, samples: list[tuple[int, str]]) -> None:
        """Every sample so far as the Table ``samples`` (step, text): a logged W&B table is
        final, so each validation logs the whole table again."""
        rows = [[step, text] for step, text in samples]
        self.log_text(key="samples", columns=["step", "text"], data=rows, step=samples[-1][0])

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            exit_code = 0 if status == "success" or _stopped_by_signal() else 1
            self._experiment.finish(exit_code=exit_code)

"""MLflow and Weights & Biases, as Lightning loggers (``configs/logger/mlflow.yaml``,
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
import secrets
import string
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes, read_json

RECORD = "trackers.json"  # RUN/trackers.json: {"mlflow": {"run_id": ...}, "wandb": {"id": ...}}

# overrides that say where or how a run is kept, not what it trains: left out of run names
_NOT_IN_NAME = ("hydra.", "hydra/", "paths.", "ckpt_path", "overwrite", "print_config", "logger")


def require(module: str, extra: str, logger: str) -> None:
    """Import ``module`` or stop with one line that names the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"logger={logger} needs the {module} package, which is not installed: "
            f'pip install -e ".[{extra}]"'
        ) from None


def overrides() -> list[str]:
    """The command-line overrides of this run (Hydra's), minus where-it-is-kept ones."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [
        o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(_NOT_IN_NAME)
    ]


def default_run_name(run_dir: str | Path) -> str:
    """``<run dir name> <overrides>``: the time it started, then what it changed."""
    return " ".join([Path(run_dir).name, *overrides()])[:250]


def recorded(run_dir: str | Path, tracker: str) -> dict:
    """What ``RUN/trackers.json`` holds for ``tracker`` ({} when nothing)."""
    return (read_json(Path(run_dir) / RECORD) or {}).get(tracker, {})


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
    from nanoforge.callbacks import StopRequested

    return isinstance(sys.exc_info()[1], StopRequested)


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
        # continue the recorded run only when this run resumes from a checkpoint
        run_id = recorded(run_dir, "mlflow").get("run_id") if resume_from else None
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

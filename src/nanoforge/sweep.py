"""What only a sweep needs: where each job runs, the value it returns, and the report.

Nothing here changes a single run. ``python src/train.py -m ...`` hands its jobs to a Hydra
launcher:

- the default launcher runs them one after another in this process;
- ``hydra/launcher=parallel`` (hydra-joblib-launcher) runs ``n_jobs`` of them at once in worker
  processes. :func:`job_scope` gives job ``k`` GPU ``k mod #GPUs`` when there are GPUs, or
  ``cores // n_jobs`` CPU threads when there are none (2 jobs x 1 thread on a 2-core machine);
- ``hydra/launcher=slurm`` / ``submitit_local`` (hydra-submitit-launcher) submit each job to
  SLURM (or to local subprocesses); SLURM starts the DDP ranks itself.

Lightning's ``strategy=ddp`` starts ranks 1..N-1 by running ``src/train.py`` again with the
command line of the job and ``hydra.run.dir=<this run's dir>``. Inside a sweep that command line
is the *sweep's* (``-m model=tiny,small ...``): each rank would start a sweep of its own in a
directory of its own. :func:`job_scope` points that command at the job instead: the job's own
overrides, ``hydra.mode=RUN`` and the job's directory, so every rank shares one directory.

Two Hydra callbacks (``configs/hydra/default.yaml``) act on multiruns only:
:class:`JobEnvironment` makes jobs in other processes find nanoforge and its resolvers, and
:class:`SweepReport` keeps the sweep's ``report.md/.csv/.png`` (``nanoforge.report``) up to date.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from nanoforge import hydra_setup
from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes
from nanoforge.machine import cpu_cores, gpu_count, launcher_rank
from nanoforge.report import STATUS_FILE, STUDY_FILE, collect, end_of_sweep, write_report

log = logging.getLogger(__name__)

# what Lightning's DDP launcher puts into os.environ; restored after each job of a sweep, so
# that the next job starts its own process group instead of joining the last one's
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _joblib_n_jobs(hc: DictConfig) -> int | None:
    """Jobs at once under the joblib launcher (joblib's -1 = all cores), else None."""
    launcher = hc.get("launcher") or {}
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return None
    n = int(launcher.get("n_jobs") or 1)
    return n if n > 0 else max(1, cpu_cores() + 1 + n)


def strategy_name(trainer: DictConfig) -> str:
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        return str(strategy.get("_target_", "custom")).rsplit(".", 1)[-1]
    return str(strategy)


def _lightning_launches_ranks(trainer: DictConfig) -> bool:
    """True when Lightning itself would start more processes for this job (DDP on one
    machine), which a joblib worker cannot do: it re-runs ``src/train.py``."""
    name = strategy_name(trainer).lower()  # ddp, FSDPStrategy, ...
    distributed = any(k in name for k in ("ddp", "fsdp", "deepspeed"))
    devices = trainer.get("devices", "auto")
    many = (isinstance(devices, int) and devices != 1) or (
        not isinstance(devices, int | str) and len(devices) > 1
    )
    return distributed and many and "SLURM_NTASKS" not in os.environ


def assign_resources(cfg: DictConfig, job_num: int, n_parallel: int) -> dict[str, Any]:
    """Give one of ``n_parallel`` concurrent jobs its share of the machine.

    With GPUs: job ``job_num`` trains on GPU ``job_num % #GPUs`` (set in ``cfg.trainer``).
    Without: it gets ``cores // n_parallel`` torch threads (at least 1). Returns what it chose.
    """

    trainer = cfg.trainer
    if _lightning_launches_ranks(trainer):
        raise UserError(
            f"trainer.strategy={strategy_name(trainer)} starts its processes by re-running "
            "src/train.py, which a parallel launcher's worker cannot do. Run DDP/FSDP sweeps "
            "with the default launcher (drop hydra/launcher=parallel) or on SLURM "
            "(hydra/launcher=slurm)."
        )
    n_gpus = gpu_count()
    single_device = trainer.get("devices", "auto") in ("auto", 1, -1)
    if n_gpus and trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda") and single_device:
        gpu = job_num % n_gpus
        trainer.accelerator, trainer.devices = "gpu", [gpu]
        return {"gpu": gpu}
    from nanoforge.threads import apply

    share = max(1, cpu_cores() // max(1, n_parallel))
    n = apply(cfg.get("threads"), share)  # threads=N asks for fewer; never more than the share
    with open_dict(cfg):
        cfg.threads = n  # what training applies again
    return {"threads": n}


def in_sweep() -> bool:
    """True inside a job of a multirun (``-m``, ``hparams_search=...``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def objective(metrics: dict, metric: str, multirun: bool | None = None) -> float | None:
    """The value a job returns to Hydra's sweeper: ``metrics[metric]``.

    In a sweep, a value that is missing, NaN or infinite (the run diverged, or never
    validated) raises instead: Hydra then records a failed job, the Optuna sweeper a failed
    trial (it cannot rank a NaN), and the sweep goes on. ``multirun`` defaults to
    :func:`in_sweep`.
    """
    multirun = in_sweep() if multirun is None else multirun
    value = metrics.get(metric)
    if multirun and not (isinstance(value, int | float) and math.isfinite(value)):
        raise FloatingPointError(
            f"{metric} is {value}: the run diverged (NaN/inf loss) or never validated. "
            "Lower optim.lr, keep trainer.gradient_clip_val, or validate at least once."
        )
    return value


@contextlib.contextmanager
def job_scope(cfg: DictConfig) -> Iterator[DictConfig]:
    """Set up one training job of a sweep (nothing changes in a single run); undo it after.

    - under the parallel launcher: the job's GPU or CPU threads (:func:`assign_resources`);
    - for Lightning's DDP launcher: the job's own command line and directory (module doc);
    - afterwards: the process group and DDP environment are cleared, so that the next job of
      the sweep, in this same process, starts DDP afresh.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        yield cfg
        return

    import torch

    n_parallel = _joblib_n_jobs(hc)
    saved_threads = torch.get_num_threads()
    if n_parallel is not None and n_parallel > 1:
        chosen = assign_resources(cfg, int(hc.job.num), n_parallel)
        what = f"GPU {chosen['gpu']}" if "gpu" in chosen else f"{chosen['threads']} CPU thread(s)"
        log.info(f"job {hc.job.num} (pid {os.getpid()}): {what}, one of {n_parallel} parallel jobs")

    saved_argv, saved_env = list(sys.argv), {k: os.environ.get(k) for k in _DDP_ENV}
    saved_run_dir = hc.run.dir
    # Lightning's DDP launcher runs `sys.argv[0] sys.argv[1:] hydra.run.dir=<hc.run.dir> ...`
    sys.argv = [sys.argv[0], *hc.overrides.task, "hydra.mode=RUN"]
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir
    try:
        yield cfg
    finally:
        sys.argv = saved_argv
        with read_write(hc.run):
            hc.run.dir = saved_run_dir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        torch.set_num_threads(saved_threads)


class JobEnvironment(Callback):
    """Hydra callback that makes sweep jobs in other processes (joblib workers, submitit jobs)
    work like jobs in this one.

    Hydra pickles its callbacks along with each job, so unpickling this object in a worker
    (before the job's config is resolved there) registers nanoforge's resolvers (``${pid:}`` in
    the sweep directory). At the start of a multirun it puts ``src/`` on ``PYTHONPATH``, so
    workers import nanoforge even from a checkout that was not pip-installed.
    """

    def __init__(self) -> None:
        hydra_setup.register_resolvers()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        hydra_setup.register_resolvers()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        # hydra.sweep.dir is ${paths.log_dir}/... and paths.root_dir is ${hydra:runtime.cwd}:
        # Hydra's sweepers resolve the sweep dir before any job has set HydraConfig, so set it
        # here, from the multirun's own config, for `${hydra:...}` to resolve
        HydraConfig.instance().set_config(config)
        check_study_storage(config)
        src = str(hydra_setup.REPO_ROOT / "src")
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if src not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([src, *paths])


def study_source(config: DictConfig) -> tuple[str, str] | None:
    """(storage URL, study name) of an Optuna search that keeps its study; else None."""
    sweeper = config.hydra.get("sweeper") or {}
    storage = sweeper.get("storage") if "optuna" in str(sweeper.get("_target_", "")) else None
    return (str(storage), str(sweeper.get("study_name"))) if storage else None


def check_study_storage(config: DictConfig) -> None:
    """Exit 2 with one line when the Optuna study's SQLite file exists but is no database
    (Optuna would end the sweep in a SQLAlchemy traceback before any trial)."""
    import sqlite3

    source = study_source(config)
    if source is None or not source[0].startswith("sqlite:///"):
        return
    path = Path(source[0].removeprefix("sqlite:///"))
    if not path.is_file():
        return  # Optuna creates it
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        from nanoforge.errors import fail

        fail(
            f"the Optuna study file {path} is not a readable SQLite database ({e}): move it "
            "away to start a new study, or keep the study elsewhere: "
            "hydra.sweeper.storage=sqlite:///OTHER.db"
        )


def summarize_study(storage: str, study_name: str) -> dict[str, Any]:
    """Every trial of the study, for the report: number, state, value, parameters."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
        for t in study.get_trials(deepcopy=False)
    ]
    return {"study_name": study_name, "storage": storage, "trials": trials}


class SweepReport(Callback):
    """Hydra callback: keeps ``report.*`` of a multirun up to date.

    After every job (in the process that ran it) it records the job's status in
    ``job_status.json`` and rebuilds the report, so the report exists even when a job fails
    and the sweep ends with that error; at the end of the multirun it rebuilds it once more.
    Single runs are left alone.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        hydra_cfg = config.get("hydra") if config is not None else None
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN or launcher_rank() != 0:
            return
        job_dir = Path(hydra_cfg.runtime.output_dir)
        failed = job_return.status != JobStatus.COMPLETED
        status: dict[str, Any] = {"status": "failed" if failed else "ok"}
        if failed:
            err = job_return._return_value  # the exception; .return_value would re-raise it
            status["error"] = f"{type(err).__name__}: {err}".strip()
        else:
            status["value"] = job_return._return_value
        atomic_write_bytes(job_dir / STATUS_FILE, json.dumps(status, default=str).encode())
        self._write(Path(hydra_cfg.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        source = study_source(config)
        if source is not None:  # the whole Optuna study, earlier runs of the search included
            try:
                summary = summarize_study(*source)
                atomic_write_bytes(sweep_dir / STUDY_FILE, json.dumps(summary).encode())
            except Exception as e:  # a report must never break the sweep it describes
                log.warning(f"could not read the Optuna study {source[1]}: {e}")
        if self._write(sweep_dir):  # plain lines, as a run ends (Hydra's logger would stamp them)
            print("end of sweep\n" + end_of_sweep(collect(sweep_dir), sweep_dir), flush=True)

    @staticmethod
    def _write(sweep_dir: Path) -> dict[str, Path] | None:
        try:
            return write_report(sweep_dir)
        except Exception as e:  # a report must never break the sweep it describes
            log.warning(f"could not write the sweep report in {sweep_dir}: {e}")
            return None

"""Hydra glue shared by the entry points: resolvers, the ``experiments/`` folder, settling the
imports, and the task runner that ends a user error in one line.

A leaf: it imports nothing else of nanoforge but ``errors``, ``machine`` (cores, GPUs, ranks
for the resolvers), ``slurm`` (the SLURM launcher's resolvers) and ``threads`` (how long
OpenMP's idle threads spin, set before torch loads), leaves themselves, and knows no task.
The command line before Hydra (typos, ``resume=``) is :mod:`nanoforge.cli`. Each entry
point hands :func:`run` the function to run::

    @hydra.main(config_path="../configs", config_name="train", version_base="1.3")
    def main(cfg):
        return hydra_setup.run(train_job, cfg)

``experiment=NAME`` loads ``experiments/NAME.yaml`` from the repository's top-level
``experiments/`` folder (not ``configs/experiment/``): named, reproducible experiments sit
beside their recorded results, and resolve from any working directory because the folder is
found from this file's location, not the current directory.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
EXPERIMENTS_DIR = REPO_ROOT / "experiments"

T = TypeVar("T")


def register_resolvers() -> None:
    # `${pid:}` makes run directories unique even for runs started in the same second
    from nanoforge.machine import parallel_jobs, rank_suffix, run_stamp

    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: os.getpid(), use_cache=True)
    # `${run_stamp:}`: <time>_<pid>, or torchrun's --rdzv-id (the same on every node)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("rank_suffix"):
        OmegaConf.register_new_resolver("rank_suffix", rank_suffix, use_cache=True)
    # `${parallel_jobs:}`: jobs at once under hydra/launcher=parallel (GPUs, else cores)
    if not OmegaConf.has_resolver("parallel_jobs"):
        OmegaConf.register_new_resolver("parallel_jobs", parallel_jobs, use_cache=True)
    # `${sqlite_url:PATH}`: a SQLite URL for PATH, its folder created (the Optuna study)
    if not OmegaConf.has_resolver("sqlite_url"):
        OmegaConf.register_new_resolver("sqlite_url", sqlite_url)
    # `${experiments_help:}`: the experiments and their first comment line, for --help
    if not OmegaConf.has_resolver("experiments_help"):
        OmegaConf.register_new_resolver("experiments_help", experiments_help)
    # `${config_groups:data,tokenizer}`: those groups and their options, for --help
    if not OmegaConf.has_resolver("config_groups"):
        OmegaConf.register_new_resolver("config_groups", config_groups)
    # `${slurm_gpus_per_node:...}`, `${slurm_tasks_per_node:...}`: hydra/launcher=slurm's requests
    from nanoforge.slurm import register_resolvers as register_slurm_resolvers

    register_slurm_resolvers()


def sqlite_url(path: str) -> str:
    """``sqlite:///ABS_PATH`` for a database file, its folder created (SQLite creates the
    file, not the folders above it)."""
    p = Path(path).expanduser().resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p}"


def experiments_help(folder: Path = EXPERIMENTS_DIR) -> str:
    """One line per experiment for ``--help``: its name and the first line of its comment."""
    lines = []
    for path in sorted(folder.glob("*.yaml")):
        comments = [
            line.lstrip("# ").rstrip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#") and "@package" not in line
        ]
        first = comments[0] if comments else ""
        if len(first) > 78:
            first = first[:77].rsplit(" ", 1)[0] + " …"
        lines.append(f"  {path.stem:<18} {first}")
    return "\n".join(lines)


def config_groups(*groups: str) -> str:
    """One line per group for an entry point's ``--help``: ``data: default, pycode, ...``
    (only the groups it reads; Hydra's ``$APP_CONFIG_GROUPS`` lists every group of configs/)."""
    lines = []
    for group in groups:
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def register_experiments(folder: Path = EXPERIMENTS_DIR) -> None:
    """Put every ``folder/*.yaml`` into Hydra's ConfigStore as group ``experiment``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for path in sorted(folder.glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="experiment", name=path.stem, node=node, package="_global_")


def setup() -> None:
    from nanoforge.threads import set_wait_policy

    set_wait_policy()  # before torch is imported: OpenMP reads it once, when loaded
    register_resolvers()
    register_experiments()


def settle_imports() -> None:
    """Take everything imported so far out of the cyclic garbage collector's sight.

    torch, Lightning and Hydra leave ~460,000 objects behind at import (their modules,
    classes, functions), and they live as long as the process. Python's cyclic collector walks
    every one of them at each full collection (0.29 s on the 2-core machine) and once more
    while the interpreter shuts down: that walk is most of the 1.3 s which even a bare
    ``python -c "import lightning.pytorch"`` spends *exiting* (bench/RESULTS.md, "Start-up").
    :func:`gc.freeze` moves them to the collector's permanent generation. Nothing else
    changes: reference counting still frees any of them that is dropped, objects made
    afterwards (the model, the Trainer, the batches) are collected as before, and the
    ``atexit`` hooks still run (``os._exit`` would skip them, and loggers such as MLflow and
    wandb flush there). What it gives up: a reference *cycle* among the frozen objects is never
    collected, and import-time objects are not garbage.

    The entry points call it right after their heavy imports, before any work. Once per
    process: in a sweep run in-process (Hydra's basic launcher, Optuna), the next job's call
    would otherwise also freeze whatever garbage the previous job left in cycles.
    """
    global _settled
    if not _settled:
        gc.freeze()
        _settled = True


_settled = False


def _is_fresh(output_dir: Path, job_name: str) -> bool:
    """True when the run directory holds only what Hydra wrote at start-up (its ``.hydra``
    record included): a folder the run made, never the working folder an entry point that
    writes no run directory (``generate.py``, ``serve.py``: ``hydra.run.dir=.``) starts in."""
    try:
        names = set(os.listdir(output_dir))
        here = output_dir.resolve() == Path.cwd().resolve()
    except OSError:
        return False
    return not here and ".hydra" in names and names <= {".hydra", f"{job_name}.log", "run.lock"}


def run(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run an entry point's ``task(cfg)``; a user error ends with one line and exit code 2.

    In a sweep (``-m``) a failing job raises instead of exiting: Hydra records it as failed,
    the other jobs still run and the sweep report lists it (see nanoforge.sweep).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from nanoforge.errors import fail, find_user_error

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    output_dir = Path(hc.runtime.output_dir)
    fresh = _is_fresh(output_dir, hc.job.name)
    try:
        return task(cfg)
    except Exception as e:
        err = find_user_error(e)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if multirun:  # the job is marked failed (its directory kept for the report)
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise
        # a run that started in a new directory and saved no checkpoint leaves nothing behind
        if fresh and not any(output_dir.glob("checkpoints/*.ckpt")):
            shutil.rmtree(output_dir, ignore_errors=True)
        fail(str(err))

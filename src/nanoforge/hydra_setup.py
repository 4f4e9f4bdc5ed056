"""Hydra glue shared by the entry points: resolvers, the ``experiments/`` folder, errors.

``experiment=NAME`` loads ``experiments/NAME.yaml`` from the repository's top-level
``experiments/`` folder (not ``configs/experiment/``): named, reproducible experiments sit
beside their recorded results, and resolve from any working directory because the folder is
found from this file's location, not the current directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = REPO_ROOT / "experiments"


def register_resolvers() -> None:
    # `${pid:}` makes run directories unique even for runs started in the same second
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: os.getpid(), use_cache=True)


def register_experiments(folder: Path = EXPERIMENTS_DIR) -> None:
    """Put every ``folder/*.yaml`` into Hydra's ConfigStore as group ``experiment``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for path in sorted(folder.glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="experiment", name=path.stem, node=node, package="_global_")


def setup() -> None:
    register_resolvers()
    register_experiments()


def print_config_tree(cfg: DictConfig, order=("data", "model", "optim", "trainer")) -> None:
    """The resolved config as a rich tree, main groups first."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold cyan")
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text.rstrip() or "null", "yaml", theme="ansi_dark"))
    rich.print(tree)


def fail(message: str, output_dir: str | None = None, fresh: bool = False) -> None:
    """End a run on a user error: one clear line on stderr, exit 2, no half-written output.

    ``fresh`` marks a run directory this process created (Hydra creates it before the job
    starts): it is removed, so a failed start leaves nothing behind.
    """
    if output_dir and fresh:
        shutil.rmtree(output_dir, ignore_errors=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-fixable error behind ``exc`` (Hydra's instantiate wraps them), if any."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from nanoforge.errors import UserError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError | MisconfigurationException):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _is_fresh(output_dir: Path, job_name: str) -> bool:
    """True when the run directory holds only what Hydra wrote at start-up."""
    try:
        return set(os.listdir(output_dir)) <= {".hydra", f"{job_name}.log"}
    except OSError:
        return False


def run_task(cfg: DictConfig, task: str):
    """Run one entry point's task; user errors end with a message and exit code 2."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    fresh = _is_fresh(output_dir, hc.job.name)
    try:
        if task == "train":
            from nanoforge.training import train

            if cfg.get("print_config", True):
                print_config_tree(cfg)
            metrics = train(cfg)
            return metrics.get(cfg.get("optimized_metric") or "val/loss")
        raise ValueError(f"unknown task {task!r}")
    except Exception as e:
        err = _user_error(e)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # a run that started in a new directory and saved no checkpoint leaves nothing behind
        saved = any(output_dir.glob("checkpoints/*.ckpt"))
        fail(str(err), str(output_dir), fresh and not saved)

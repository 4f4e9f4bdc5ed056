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
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

# overrides that say where or how a run is kept, not what it trains: left out of its name
_NOT_IN_NAME = ("hydra.", "hydra/", "paths.", "ckpt_path", "overwrite", "print_config", "resume")


def run_name(overrides: list[str] | None = None, max_len: int = 120) -> str:
    """A readable TensorBoard run name from the command-line overrides (Hydra's, by default):
    ``model=tiny,optim.lr=0.001``; ``default`` for a run with none."""
    if overrides is None:
        overrides = _hydra_overrides()
    kept = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_IN_NAME)]
    name = ",".join(kept) or "default"
    name = re.sub(r"[/\\\s]+", "_", name)  # a path separator would nest the run a level down
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
    first = [o for o in overrides if _key(o) in varied]
    return first + [o for o in overrides if _key(o) not in varied]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _swept_keys(multirun_yaml: Path, job_overrides: list[str]) -> list[str]:
    """Keys whose sweep command-line value differs from the job's own (``lr=1e-3,3e-3``)."""
    from omegaconf import OmegaConf

    try:
        sweep = [str(o) for o in OmegaConf.load(multirun_yaml).hydra.overrides.task]
    except Exception:  # no file (a launcher that writes none): no order to improve
        return []
    return [_key(o) for o in sweep if o not in job_overrides]


def run_hparams(overrides: list[str] | None = None) -> dict[str, bool | int | float | str]:
    """The HPARAMS tab's columns: each override as ``key: value`` (numbers as numbers), the
    settings that tell runs apart; the whole config is in hparams.yaml and .hydra/."""
    if overrides is None:
        overrides = _hydra_overrides()
    columns: dict[str, bool | int | float | str] = {}
    for o in overrides:
        key = _key(o)
        if "=" not in o or key.startswith(_NOT_IN_NAME):
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
        params = {k: v for k, v in params.items() if not str(k).startswith("tokenizer")}
        super().log_hyperparams(params)  # hparams.yaml (no summary: default_hp_metric=False)
        columns = run_hparams() or {"overrides": "default"}
        exp, ssi, sei = hparams(columns, dict.fromkeys(self.metric_tags, 0.0))
        writer = self.experiment._get_file_writer()
        for summary in (exp, ssi, sei):
            writer.add_summary(summary)

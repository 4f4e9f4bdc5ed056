"""train(cfg): build everything from the composed config, fit, and report.

cfg.data    -> TextDataModule   (data.py: the tokenizer is built from the corpus here)
cfg.model   -> GPTConfig        (model.py, + vocab_size from the tokenizer)
cfg.optim   -> OptimConfig      (optim.py: AdamW or Muon, warmup + WSD/cosine schedule)
               both inside GPTModule (module.py)
cfg.trainer / callbacks / logger -> lightning.Trainer (callbacks.py for ours)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from nanoforge import extension, rundir, threads
from nanoforge.callbacks import GracefulStop, RunSummary, TokenThroughput
from nanoforge.checkpoint import check_resumable, config_differences, load_model, load_raw
from nanoforge.console import corpus_prompt, end_of_run, quiet_libraries
from nanoforge.errors import NonFiniteLossError, UserError, find_user_error
from nanoforge.module import GPTModule
from nanoforge.optim import OptimConfig

log = logging.getLogger(__name__)


def build_object(config: DictConfig, **kwargs) -> Any:
    """``hydra.utils.instantiate``, but a UserError raised while building stays a UserError
    (Hydra wraps it in an InstantiationException otherwise)."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        err = find_user_error(e)
        if isinstance(err, UserError):
            raise err from None
        raise


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """A config group of named entries (callbacks, loggers) -> a list of objects."""
    if not group:
        return []
    entries = [c for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]
    return [build_object(c) for c in entries]


def check_config(cfg: DictConfig) -> None:
    """Catch impossible settings before anything is built, with the key to change."""
    max_steps = cfg.trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise UserError(f"trainer.max_steps must be a positive integer, got {max_steps!r}")
    vci = cfg.trainer.get("val_check_interval")
    if isinstance(vci, int) and vci <= 0:
        raise UserError(f"trainer.val_check_interval must be > 0 steps, got {vci}")
    threads.check(cfg.get("threads"))
    check_precision(cfg.trainer.get("precision", 32))
    check_trackers(cfg.get("logger"))
    check_accelerator(str(cfg.trainer.get("accelerator", "auto")))


def check_trackers(loggers: DictConfig | None) -> None:
    """An optional tracker's package missing: the one line naming the extra, before the data."""
    from nanoforge.loggers import require

    needs = {"nanoforge.loggers.MLflow": "mlflow", "nanoforge.loggers.Wandb": "wandb"}
    for entry in (loggers or {}).values():
        package = (
            needs.get(str(entry.get("_target_", ""))) if isinstance(entry, DictConfig) else None
        )
        if package:
            require(package, package, package)


def check_precision(precision) -> None:
    """Lightning's own list of precisions (a union of Literals), checked before the data."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    def flatten(t) -> list:
        return [x for a in typing.get_args(t) for x in (flatten(a) if typing.get_args(a) else [a])]

    accepted = {str(p) for p in flatten(_PRECISION_INPUT)}
    if str(precision) not in accepted:
        shown = ", ".join(p for p in sorted(accepted) if "-" in p and "engine" not in p)
        raise UserError(f"trainer.precision={precision} is not a precision: use one of {shown}")


def check_accelerator(accelerator: str) -> None:
    """A GPU asked for where torch sees none: say so now, not after the data is built."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build seeing no GPU"
        raise UserError(
            f"trainer.accelerator={accelerator} but torch {torch.__version__} is {build}: use "
            "trainer=cpu (or trainer=ddp_cpu), or install a CUDA build of torch (README: GPU "
            "machines)"
        )
    if accelerator == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("trainer.accelerator=mps but this machine has no MPS: use trainer=cpu")


def _recorded_tokenizer(ckpt_path):
    """The tokenizer a training checkpoint carries, or None when it has none (then
    check_resumable says what is wrong with the checkpoint)."""
    from nanoforge.tokenizer import tokenizer_from_state

    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        return None
    try:
        state = load_raw(path).get("hyper_parameters", {}).get("tokenizer")
        return tokenizer_from_state(state) if state is not None else None
    except UserError:
        return None


def build(cfg: DictConfig):
    """Everything train() needs, built but not run (tests use this too)."""
    check_config(cfg)
    if cfg.get("seed") is not None:  # `is not None`: seed=0 is a seed too
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_object(cfg.data)
    init_from = cfg.get("init_from")
    if init_from and cfg.get("ckpt_path"):
        raise UserError(
            "init_from= starts a new run from a checkpoint's weights and ckpt_path= (resume=) "
            "continues a run: give one of them"
        )
    start = load_model(init_from) if init_from else None
    if start is not None:  # fine-tuning keeps the checkpoint's tokenizer
        datamodule.tokenizer = start[1]
    elif cfg.get("ckpt_path"):  # a resumed run goes on with its own tokenizer (e.g. GPT-2's,
        recorded = _recorded_tokenizer(cfg.ckpt_path)  # which its corpus cannot rebuild)
        if recorded is not None:
            datamodule.tokenizer = recorded
    datamodule.setup("fit")  # builds the tokenizer: the model's vocab_size comes from it
    tok = datamodule.tokenizer
    model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": tok.vocab_size}
    module = GPTModule(
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tok.state_dict(),
        compile=bool(cfg.get("compile", False)),
        skip_nonfinite=bool(cfg.get("skip_nonfinite_loss", False)),
    )
    if start is not None:
        weights = start[0]
        differences = config_differences(weights.config.to_dict(), module.config.to_dict())
        if differences:
            raise UserError(
                f"init_from={init_from} holds another model: {'; '.join(differences)}. "
                "Use the model settings it was trained with."
            )
        module.model.load_state_dict(weights.state_dict())
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # one switch turns the bar off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBarBase)]
    loggers = _instantiate_group(cfg.get("logger"))
    peak_flops = cfg.trainer.get("peak_flops")  # ours, not a Trainer argument
    for c in callbacks:
        if isinstance(c, TokenThroughput) and peak_flops:
            c.peak_flops = float(peak_flops)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.pop("peak_flops", None)
    trainer_cfg = OmegaConf.create(trainer_cfg)
    trainer: L.Trainer = build_object(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def check_torchrun_run_dir(cfg: DictConfig) -> None:
    """Every process of a torchrun job must write into one run directory: without
    ``--rdzv-id`` (the directory's name) or the same ``hydra.run.dir``, each would make its own."""
    import os

    from hydra.core.hydra_config import HydraConfig

    if os.environ.get("TORCHELASTIC_RUN_ID") != "none" or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return
    given = HydraConfig.initialized() and any(
        o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra
    )
    if not given:
        raise UserError(
            "torchrun started this job's processes without --rdzv-id, so each would write its "
            "own run directory: pass --rdzv-id=NAME to torchrun on every node (the run goes to "
            "logs/train/runs/NAME), or the same hydra.run.dir=DIR to every node"
        )


def train(cfg: DictConfig) -> dict:
    """Fit the model; return the run summary (what ``metrics.json`` holds)."""
    check_torchrun_run_dir(cfg)
    from nanoforge.slurm import requeued_checkpoint

    requeued = None if cfg.get("ckpt_path") else requeued_checkpoint(cfg.paths.output_dir)
    if requeued:  # a requeued SLURM job (preempted): it continues where it was stopped
        with open_dict(cfg):
            cfg.ckpt_path = requeued
    # the run directory is this run's alone: locked, never another run's (nanoforge.rundir)
    rundir.claim(cfg.paths.output_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
    quiet_libraries()
    check_config(cfg)  # before the data is read: a bad setting answers at once
    threads.apply(cfg.get("threads"))  # a parallel sweep's job has its share here already
    log.info(f"run directory: {cfg.paths.output_dir}")
    # where a resume starts: a finished run extended to more steps continues from the step
    # its cool-down began, as if it had been planned longer (nanoforge.extension)
    start = None
    if cfg.get("ckpt_path"):
        start = extension.plan(
            cfg.ckpt_path, OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True)),
            cfg.trainer.max_steps,
        )  # fmt: skip
    datamodule, module, trainer = build(cfg)
    n = module.model.num_params()
    log.info(
        f"GPT with {n / 1e6:.2f}M parameters, vocab {module.tokenizer.vocab_size}, "
        f"{len(datamodule.train_ids):,} train / {len(datamodule.val_ids):,} val tokens, "
        f"{trainer.max_steps:,} steps"
    )
    ckpt_path = str(start.path) if start is not None else None
    if ckpt_path:  # a clear error now for a foreign checkpoint, another model or other text
        tokenizer = module.tokenizer.state_dict()
        step = check_resumable(
            ckpt_path, module.config.to_dict(), datamodule.state_dict(), tokenizer
        )
        at = f" at step {step}" if step is not None else ""
        log.info(start.message or f"resuming from {ckpt_path}{at}")
        if start.warning:
            log.warning(start.warning)
        if trainer.is_global_zero:  # the set-aside cool-down leaves the record
            start.apply([lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)])
    # weights_only=True: resuming never unpickles code
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # SIGTERM / Ctrl-C: saved, flushed; say how to resume
        stop = next(c for c in trainer.callbacks if isinstance(c, GracefulStop))
        _end(trainer, module, cfg, "stopped")
        if trainer.is_global_zero:
            log.warning(stop.resume_hint(trainer.global_step))
        sys.exit(stop.exit_code)
    except NonFiniteLossError as e:
        log.error(f"stopped: {e}")
        _end(trainer, module, cfg, "failed", str(e))
        raise
    return _end(trainer, module, cfg, "finished")


def _end(trainer, module, cfg: DictConfig, status: str, error: str = "") -> dict:
    """The run summary (what ``metrics.json`` holds), printed as the run's last lines."""
    summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
    if summary is None:
        return {}
    result = summary.summary(trainer, module, status, error)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        # through logging: on the console and in train.log, for whoever tails a cluster job
        prompt = _prompt(trainer.datamodule)
        text = end_of_run(
            result,
            cfg.paths.output_dir,
            prompt,
            next_steps=not _in_multirun(),
            eval_data=_eval_data(trainer.datamodule, cfg.paths.data_dir),
        )
        log.info("end of run\n" + text)
    return result


def _eval_data(datamodule, data_dir: str) -> str:
    """``data=... data.path=...`` for the end-of-run ``eval.py`` hint when the corpus lies
    outside the data folder (``eval.py`` follows a recorded path only inside it)."""
    import shlex

    from nanoforge.corpora import corpus_outside

    path = getattr(datamodule, "hparams", {}).get("path")
    if not path or not corpus_outside(path, data_dir):
        return ""
    return f"data={datamodule.corpus} data.path={shlex.quote(str(path))}"


def _prompt(datamodule) -> str | None:
    """The start of the run's own training text, as the end-of-run hint's prompt."""
    try:
        return corpus_prompt(datamodule.tokenizer.decode(datamodule.train_ids[:512]))
    except Exception:  # a datamodule without text (a test's): the hint has no prompt
        return None


def _in_multirun() -> bool:
    """A job of a sweep (``-m``): what to run next is said once, when the sweep ends."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

"""Hydra glue shared by the entry points: resolvers, the ``experiments/`` folder, the config
tree, ``resume=RUN_DIR``, and the one-line exit on a user error.

A leaf: it imports nothing else of nanoforge but ``errors``, ``slurm`` (the SLURM
launcher's resolvers) and ``threads`` (how long OpenMP's idle threads spin, set before torch
loads), leaves themselves, and knows no task. Each entry
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


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parallel_jobs() -> int:
    """Default number of jobs at once for ``hydra/launcher=parallel``: one per GPU, or one
    per CPU core when there is no GPU (each then trains with one thread)."""
    return gpu_count() or cpu_cores()


def launcher_rank() -> int:
    """Non-zero in any process that is not global rank 0 as its launcher set it up: torchrun
    (RANK), SLURM (SLURM_PROCID), a node other than the first (NODE_RANK, GROUP_RANK), or
    Lightning's DDP launcher for local ranks > 0 (LOCAL_RANK); 0 for a process nobody
    launched as a rank. (The value is the first non-zero of those, not always the global rank.)"""
    for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def run_stamp() -> str:
    """The run directory's name: ``<time>_<pid>``; under torchrun with ``--rdzv-id=ID``, the
    ID, so the processes of every node (started at other times, with other pids) agree."""
    import datetime

    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return run_id
    return f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


def rank_suffix() -> str:
    """The log-file suffix of a process that shares rank 0's run directory: ``_rank<R>`` for
    rank R > 0 of torchrun or srun, ``_node<N>`` for node N > 0 started with Lightning's
    NODE_RANK. (Lightning's DDP launcher names its own children's logs.)"""
    env = os.environ
    key = "SLURM_PROCID" if "SLURM_PROCID" in env else "RANK"
    if "TORCHELASTIC_RUN_ID" in env or key == "SLURM_PROCID":
        rank = env.get(key, "")
        return f"_rank{rank}" if rank.isdigit() and int(rank) > 0 else ""
    node = env.get("NODE_RANK", "")
    if "LOCAL_RANK" not in env and node.isdigit() and int(node) > 0:
        return f"_node{node}"
    return ""


def register_resolvers() -> None:
    # `${pid:}` makes run directories unique even for runs started in the same second
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


# Hydra's own command-line flags: where one is given, Hydra answers (help, config dump, ...)
_HYDRA_FLAGS = {
    "-h",
    "--help",
    "--hydra-help",
    "-c",
    "--cfg",
    "-i",
    "--info",
    "-p",
    "--package",
    "--resolve",
    "-sc",
    "--shell-completion",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
    "--version",
}


def _quoted(word: str) -> str | None:
    """``key=value`` with the value quoted for Hydra's grammar, which reads only ASCII (and
    none of ``()[]{},='"``) unquoted: ``prompt=“Ω”`` becomes ``prompt="“Ω”"``. None when the
    value holds both kinds of quote."""
    key, _, value = word.partition("=")
    for quote in ('"', "'"):
        if quote not in value:
            return f"{key}={quote}{value}{quote}"
    return None


def _all_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        full = f"{prefix}{key}"
        keys.append(full)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            keys += _all_keys(value, full + ".")
    return keys


def check_command_line(argv: list[str], config_name: str) -> list[str]:
    """Answer a mistaken override at once, in one line, exit 2 (before Hydra's multi-line
    report, and before a run starts): a group option that does not exist (optional groups
    too: Hydra silently skips ``experiment=nope``), a key that does not exist (with the
    closest keys), a value Hydra's grammar cannot read. Returns ``argv`` with pasted
    non-ASCII values quoted for Hydra, so ``prompt=Ω`` works as typed.

    Costs one composition of the config (~0.1 s); Hydra's own flags skip it.
    """
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException, MissingConfigException

    args = argv[1:]
    if any(a.split("=", 1)[0] in _HYDRA_FLAGS for a in args):
        return argv
    flags = [a for a in args if a.startswith("-")]
    words = [a for a in args if not a.startswith("-")]
    if not words:  # nothing to check: Hydra composes the defaults itself
        return argv
    parser = OverridesParser.create()
    overrides = []
    for i, word in enumerate(words):
        if "=" not in word:
            fail(f"{word!r} is not an override: write key=value (e.g. model=small)")
        try:
            overrides.append(parser.parse_override(word))
            continue
        except HydraException:  # OverrideParseException, or the lexer's token error
            quoted = _quoted(word)
        try:  # a pasted value (curly quotes, em-dash, Ω) works as the string it is
            overrides.append(parser.parse_override(quoted or ""))
            words[i] = quoted
        except HydraException:
            key = word.split("=", 1)[0]
            fail(
                f"{word}: Hydra cannot read this value; quote it for Hydra inside shell quotes, "
                f"e.g. '{key}=\"...\"' (a value with both kinds of quote needs \\' escapes)"
            )

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        composed = []  # the overrides to compose: a sweep's first value stands for all
        for override, word in zip(overrides, words, strict=True):
            key = override.get_key_element().lstrip("+~")
            value = override.value()
            if isinstance(value, ChoiceSweep):
                values = list(override.sweep_string_iterator())
            elif override.is_sweep_override():
                values = None  # range()/interval()/glob(): the key is checked below
            else:
                values = value if isinstance(value, list) else [value]
            if loader.repository.group_exists(key) and override.is_delete() is False:
                options = loader.get_group_options(key)
                for v in values or []:
                    if v is not None and str(v) not in options:
                        close = difflib.get_close_matches(str(v), options, n=1)
                        hint = f" (did you mean {key}={close[0]}?)" if close else ""
                        fail(
                            f"{key}={v}: no such option{hint}; {key} is one of: "
                            f"{', '.join(options)}"
                        )
            if values is None:
                continue
            if override.is_sweep_override():
                word = f"{override.get_key_element()}={values[0]}"
            composed.append(word)
        try:
            cfg = compose(config_name, overrides=composed, return_hydra_config=True)
        except MissingConfigException as e:
            fail(str(e).splitlines()[0])
        except HydraException as e:
            message = str(e).splitlines()[0]
            bad = next((w for w in composed if f"'{w.split('=', 1)[0]}'" in message), None)
            if bad is None:
                fail(message)
            key = bad.split("=", 1)[0].lstrip("+~")
            rest = [w for w in composed if w is not bad]
            try:
                known = _all_keys(compose(config_name, overrides=rest))
            except HydraException:
                known = []
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            fail(f"{key} is not a config key: {hint}(to add a new key: +{bad.lstrip('+~')})")
    for override in overrides:  # a key that range()/interval() varies must exist too
        key = override.get_key_element()
        missing = object()
        varied = override.is_sweep_override() and not key.startswith(("+", "hydra."))
        if varied and OmegaConf.select(cfg, key, default=missing) is missing:
            fail(f"{key} is not a config key (to add a new key: +{key}=...)")
    return [argv[0], *flags, *words]


def _is_fresh(output_dir: Path, job_name: str) -> bool:
    """True when the run directory holds only what Hydra wrote at start-up."""
    try:
        return set(os.listdir(output_dir)) <= {".hydra", f"{job_name}.log", "run.lock"}
    except OSError:
        return False


def run(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run an entry point's ``task(cfg)``; a user error ends with one line and exit code 2.

    In a sweep (``-m``) a failing job raises instead of exiting: Hydra records it as failed,
    the other jobs still run and the sweep report lists it (see nanoforge.sweep).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from nanoforge.errors import find_user_error

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
        saved = any(output_dir.glob("checkpoints/*.ckpt"))
        fail(str(err), str(output_dir), fresh and not saved)


def find_runs(log_dir: str | os.PathLike = "logs") -> list[Path]:
    """Every run directory under ``log_dir`` as ``configs/hydra/default.yaml`` lays them out
    (``<task>/runs/<time>``, ``<task>/multiruns/<time>/<job>``), most recently started first
    (a resume counts as a start: Hydra rewrites ``.hydra/config.yaml``)."""
    root = Path(log_dir)
    found = []
    for record in [
        *root.glob("*/runs/*/.hydra/config.yaml"),
        *root.glob("*/multiruns/*/*/.hydra/config.yaml"),
    ]:
        try:
            found.append((record.stat().st_mtime, record.parent.parent))
        except FileNotFoundError:  # removed meanwhile
            continue
    return [run for _, run in sorted(found, key=lambda t: t[0], reverse=True)]


def latest_run(log_dir: str | os.PathLike = "logs", holding=("last.ckpt",)) -> Path:
    """The most recently started run under ``log_dir`` that holds one of ``holding`` in its
    ``checkpoints/`` (``resume=last``, ``ckpt=last``)."""
    from nanoforge.errors import UserError

    for run in find_runs(log_dir):
        if any((run / "checkpoints" / name).is_file() for name in holding):
            return run
    raise UserError(
        f"`last`: no run under {log_dir}/ has checkpoints/{' or '.join(holding)}. Pass a run "
        "directory instead (python src/runs.py lists them)."
    )


def expand_resume(argv: list[str]) -> list[str]:
    """Turn ``resume=RUN_DIR`` into the overrides that continue that run in place.

    The run's recorded overrides (``RUN_DIR/.hydra/overrides.yaml``) are replayed first, the new
    command-line overrides go on top (a key given again replaces the recorded one), and the run
    continues from ``RUN_DIR/checkpoints/last.ckpt`` in ``RUN_DIR`` itself: same TensorBoard
    run, same samples.txt, same metrics.json. ``resume=last`` is the most recent run under
    ``logs/`` that has a ``last.ckpt``.
    """
    from nanoforge.errors import UserError

    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    if str(run_dir) == "last":  # the most recent run of this folder's logs/
        try:
            run_dir = latest_run("logs", ("last.ckpt",))
        except UserError as e:
            fail(f"resume={e}")
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    last = run_dir / "checkpoints" / "last.ckpt"
    if not overrides_file.is_file():
        fail(
            f"resume={run_dir}: not a run directory (no .hydra/overrides.yaml). "
            "Pass the directory of an earlier training run."
        )
    if not last.is_file():
        fail(
            f"resume={run_dir}: the run has no checkpoints/last.ckpt to resume from "
            "(it stopped before its first checkpoint); start it again instead."
        )

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    new = [a for a in argv[1:] if not a.startswith("resume=")]
    new_keys = {key(a) for a in new if "=" in a}
    dropped = {"ckpt_path", "hydra.run.dir", "overwrite", "init_from"}
    # as written: an override like +x=${paths.output_dir} is replayed, not resolved here
    recorded = [str(o) for o in OmegaConf.to_container(OmegaConf.load(overrides_file))]
    replay = [o for o in recorded if key(o) not in new_keys | dropped]
    return [argv[0], *replay, *new, f"hydra.run.dir={run_dir}", f"ckpt_path={last}"]

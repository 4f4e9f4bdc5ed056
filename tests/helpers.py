"""What the tests share that is not a fixture: the checkout's paths, a generated corpus, the
real configs composed with temporary paths, the entry points run in subprocesses (with an
environment independent of the caller's shell) and readers of what a run leaves.

``from tests.helpers import compose_run, make_text``; the fixtures are in conftest.py.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIGS = ROOT / "configs"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# Variables of the caller's shell that change what the code under test does, dropped from the
# tests' environment (in-process and subprocesses): the shell's last command (`$_`, which
# os.path.expandvars expands), a cluster job or launcher around the test run (Lightning would
# join it), the trackers' and Hydra's settings, Python's warnings and rich's terminal guesses.
CALLER_ONLY = {
    "_",
    "OLDPWD",
    "HYDRA_FULL_ERROR",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PYTHONWARNINGS",
    "PYTHONDEVMODE",
    "PYTHONOPTIMIZE",
    "PYTHONSAFEPATH",
    "COLUMNS",
    "LINES",
    "FORCE_COLOR",
    "NO_COLOR",
    "CLICOLOR_FORCE",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
}
CALLER_ONLY_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PL_", "WANDB_", "MLFLOW_", "OMPI_", "PMI_")
KEPT = {"SLURM_CONF"}  # make test-slurm points the slurm tests at its local cluster


def caller_only(name: str) -> bool:
    """True for an environment variable the tests must not inherit (see CALLER_ONLY)."""
    if name in KEPT:
        return False
    return name in CALLER_ONLY or name.startswith(CALLER_ONLY_PREFIXES)


def clean_env(extra: dict | None = None, base: dict | None = None) -> dict:
    """An environment for a test's subprocess: ``base`` (this process's) without what only the
    caller's shell holds, hash seed fixed, plus ``extra``."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not caller_only(k)}
    env["PYTHONHASHSEED"] = "0"
    return {**env, **(extra or {})}


def with_pythonpath(*paths: Path | str) -> dict:
    """``{"PYTHONPATH": ...}`` with ``paths`` first (a test probe's module, importable by the
    entry point's subprocesses), then this process's PYTHONPATH."""
    return {"PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}


def make_text(n_chars: int = 20_000, seed: int = 0) -> str:
    """Deterministic play-like text: speakers, lines, blank lines."""
    rng = random.Random(seed)
    words = [
        "the",
        "king",
        "queen",
        "love",
        "night",
        "day",
        "sweet",
        "death",
        "good",
        "lord",
        "my",
        "thy",
        "heart",
        "fair",
    ]
    names = ["ROMEO", "JULIET", "FIRST CITIZEN", "HAMLET"]
    parts, size = [], 0
    while size < n_chars:
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize()
            + rng.choice(".,;!?")
            for _ in range(rng.randint(1, 4))
        ]
        block = f"{rng.choice(names)}:\n" + "\n".join(lines) + "\n\n"
        parts.append(block)
        size += len(block)
    return "".join(parts)


def compose(
    overrides: list[str] | None = None,
    config_name: str = "train",
    return_hydra_config: bool = False,
):
    """Compose the real configs as the entry point would (with the ``hydra`` node, launcher
    and sweeper included, when ``return_hydra_config``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra_compose(
            config_name, overrides=overrides or [], return_hydra_config=return_hydra_config
        )


def compose_run(root: Path, *overrides: str):
    """``train`` composed for a quiet test run under ``root`` (the run dir is ``root/run``)."""
    base = [
        f"paths.root_dir={root}",
        f"paths.output_dir={root / 'run'}",
        "model=tiny",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    return compose([*base, *overrides])


def run_entry(script: str, *args: str, cwd: Path, timeout: int = 180, env: dict | None = None):
    """Run a real entry point (src/<script>) in a subprocess; returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(SRC / script), *args],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(script: str, *args: str, cwd: Path, monkeypatch, capsys=None):
    """Run the entry point src/<script> in this process, as ``python src/<script> ARGS`` from
    ``cwd`` would (its command-line checks, Hydra's main, the task runner): no interpreter to
    start, for what a subprocess adds nothing to. Returns (exit code, stdout, stderr); with no
    ``capsys`` (a module-scoped fixture, ``pytest.MonkeyPatch.context()`` as ``monkeypatch``)
    the output is not captured and both are empty."""
    import runpy

    import torch
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(SRC / script), *args])
    threads, hydra_cfg = torch.get_num_threads(), HydraConfig.instance().cfg
    logs = _logging_state()
    if capsys is not None:
        capsys.readouterr()  # what the test printed before
    try:
        runpy.run_path(str(SRC / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = hydra_cfg
        torch.set_num_threads(threads)  # the entry point's threads= applies to its process
        _restore_logging(logs)  # Hydra's job logging: the run's train.log handler, levels
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def _logging_state() -> dict:
    """The handlers, level and flags of every logger (the root included)."""
    import logging

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return {
        lg: (list(lg.handlers), lg.level, lg.disabled, lg.propagate)
        for lg in loggers
        if isinstance(lg, logging.Logger)
    }


def _restore_logging(state: dict) -> None:
    """Put back what :func:`_logging_state` saw; close the handlers an entry point added (a run
    directory's log file, maybe removed since): the next test logs where it did before. A
    logger made during the run keeps its settings, less its log files."""
    import logging

    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if not isinstance(lg, logging.Logger):
            continue
        if lg not in state:  # made during the run: keep it, less the files it writes to
            for h in [h for h in lg.handlers if isinstance(h, logging.FileHandler)]:
                h.close()
                lg.removeHandler(h)
            continue
        handlers, level, disabled, propagate = state[lg]
        for h in lg.handlers:
            if h not in handlers:
                h.close()
        lg.handlers[:] = handlers
        lg.level, lg.disabled, lg.propagate = level, disabled, propagate


def event_files_sort_in_order() -> None:
    """Make the next TensorBoard event files of this process sort in the order they are made.

    Their names end in ``<time>.<host>.<pid>.<n>``, n a per-process counter: two files made in
    the same second by one process (two runs of one test, in-process) sort as text, and
    ``...9`` after ``...10``: TensorBoard then reads the later file first and drops the earlier
    one's steps. Moving the counter up to a round number (never down: names stay unique) keeps
    the next hundred files at one digit count."""
    from tensorboard.summary.writer import event_file_writer

    counter = event_file_writer._global_uid
    with counter._lock:
        counter._value = 10 ** len(str(counter._value + 100))


def run_python(code: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 180):
    """``python -c CODE`` in a fresh interpreter (for what only a whole process shows: its
    imports, its environment, its state at exit); ``env``: the whole environment (default:
    :func:`clean_env`); returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def entry_point_code(script: str, *args: str) -> str:
    """Code for :func:`run_python` that runs the entry point src/<script> with ``args`` as
    ``__main__``, so that code after it (or an ``atexit`` hook before it) can inspect the
    process the entry point left."""
    return (
        "import runpy, sys\n"
        f"sys.argv = [{str(SRC / script)!r}, *{list(args)!r}]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )


def run_dirs(cwd: Path, task: str = "train") -> list[Path]:
    """The single-run directories train.py made under ``cwd`` (``logs/<task>/runs/*``)."""
    return sorted((cwd / "logs" / task / "runs").glob("*"))


def tb_dir(run: Path) -> Path:
    """The one folder holding a run's TensorBoard event files (``RUN/tensorboard/<name>``)."""
    (folder,) = {p.parent for p in (run / "tensorboard").glob("*/events.out.tfevents.*")}
    return folder


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file (a sweep's report.csv) as dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def checkout_files(root: Path = ROOT) -> set[str] | None:
    """The untracked and ignored files of the git checkout at ``root`` (``git status
    --porcelain --ignored -uall``), caches left out; None when ``root`` is no git checkout."""
    try:
        r = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "-z"],
            cwd=root,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    caches = {".pytest_cache", "__pycache__", ".ruff_cache"}
    found = set()
    for entry in r.stdout.decode(errors="replace").split("\0"):
        status, path = entry[:2], entry[3:]
        if status in ("??", "!!") and not caches & set(Path(path).parts):
            found.add(path)
    return found


def make_run(log_dir: Path, name: str, started: float, *, metrics=None, ckpt=True) -> Path:
    """A training run's directory under ``log_dir`` as Hydra and a run leave it, started
    (its config written) at ``started``; with a last.ckpt unless ``ckpt=False``."""
    from omegaconf import OmegaConf

    run = log_dir / "train" / "runs" / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(["model=tiny", f"seed={name}"]), run / ".hydra" / "overrides.yaml"
    )
    (run / ".hydra" / "config.yaml").write_text(
        "task_name: train\nmodel: {}\noptim: {}\ntrainer: {}\nckpt_path: null\nseed: 1\n"
    )
    os.utime(run / ".hydra" / "config.yaml", (started, started))
    if ckpt:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run

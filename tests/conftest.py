"""Shared fixtures and helpers: the real configs composed with temporary paths, a small
generated corpus, the entry points run in subprocesses, and one tiny model trained in-process.

Test files mirror the package (``test_<module>.py`` specifies ``nanoforge/<module>.py``);
``test_e2e_*.py`` run the real entry points in subprocesses and are marked ``slow``.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(SRC))

from nanoforge import hydra_setup  # noqa: E402

hydra_setup.setup()


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


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(make_text(), encoding="utf-8")
    return p


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


@pytest.fixture
def cfg_factory(tmp_path):
    """``cfg_factory(*overrides)``: :func:`compose_run` under this test's ``tmp_path``."""
    return lambda *overrides: compose_run(tmp_path, *overrides)


@pytest.fixture
def hydra_config():
    """``hydra_config(cfg)`` makes ``cfg`` (composed with its ``hydra`` node) the current
    HydraConfig, as inside a running job; the previous one is put back afterwards."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg

    def set_config(cfg):
        HydraConfig.instance().set_config(cfg)
        return HydraConfig.get()

    yield set_config
    HydraConfig.instance().cfg = saved


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The run directory of ``model=tiny`` trained in-process for 10 steps on a generated
    corpus (``corpus.txt`` beside it) with the real composed configs, validating at steps 5 and
    10: checkpoints (best, last), samples.txt and metrics.json, as ``train.py`` leaves them."""
    from nanoforge.training import build

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(30_000), encoding="utf-8")
    cfg = compose_run(
        root,
        "data=text",
        f"data.path={corpus}",
        "data.val_batches=2",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "callbacks.text_samples.max_new_tokens=20",
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return root / "run"


def run_entry(script: str, *args: str, cwd: Path, timeout: int = 180, env: dict | None = None):
    """Run a real entry point (src/<script>) in a subprocess; returns CompletedProcess."""
    e = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    e.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(SRC / script), *args],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_python(code: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 180):
    """``python -c CODE`` in a fresh interpreter (for what only a whole process shows: its
    imports, its environment, its state at exit); returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
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


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two, and far faster on a busy machine
    (spinning OpenMP threads of several processes fight for the same cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch random state."""
    torch.manual_seed(0)

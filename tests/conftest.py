"""Shared fixtures: composed configs pointed at temporary folders, small generated corpora."""

from __future__ import annotations

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


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose the real configs (as the entry point would) with test-friendly paths."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [])


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides: str):
        base = [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
            "model=tiny",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ]
        return compose([*base, *overrides])

    return factory


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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield

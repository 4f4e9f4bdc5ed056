"""Evaluate a checkpoint on a whole validation split: ``python src/eval.py ckpt=PATH``, or on
lm-evaluation-harness tasks: ``python src/eval.py ckpt=PATH tasks=hellaswag,lambada_openai``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

import hydra
from omegaconf import DictConfig

from nanoforge import cli, hydra_setup

hydra_setup.setup()


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from nanoforge.data import TextDataModule  # noqa: F401  (Lightning: imported before settling)
    from nanoforge.inference import evaluate  # here: `--help` answers without loading torch

    hydra_setup.settle_imports()  # the import-time objects: no garbage collection walks them

    hydra_setup.run(harness_tasks if cfg.get("tasks") else evaluate, cfg)


def harness_tasks(cfg: DictConfig):
    """``tasks=...``: lm-evaluation-harness tasks (an extra: without it, one line naming it)."""
    from nanoforge.harness import evaluate_tasks

    return evaluate_tasks(cfg)


def task_list(argv: list[str]) -> list[str]:
    """``tasks=a,b`` as typed becomes Hydra's list ``tasks=[a,b]`` (Hydra reads an unquoted
    comma as a sweep); outside a ``--multirun``, where a sweep over tasks stays possible."""
    if "-m" in argv or "--multirun" in argv:
        return argv
    return [
        f"tasks=[{w.removeprefix('tasks=')}]"
        if w.startswith("tasks=") and "," in w and w[6:7] not in ("[", "'", '"')
        else w
        for w in argv
    ]


if __name__ == "__main__":
    # typos: one line, exit 2
    sys.argv = cli.check_command_line(task_list(sys.argv), "eval")
    main()

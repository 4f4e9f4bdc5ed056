"""Evaluate a checkpoint on a whole validation split: ``python src/eval.py ckpt=PATH``."""

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

    hydra_setup.run(evaluate, cfg)


if __name__ == "__main__":
    sys.argv = cli.check_command_line(sys.argv, "eval")  # typos: one line, exit 2
    main()

"""Export a checkpoint for Hugging Face ``transformers``:
``python src/export.py ckpt=RUN_DIR_OR_CKPT out=DIR``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

import hydra
from omegaconf import DictConfig

from nanoforge import cli, hydra_setup

hydra_setup.setup()


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    from nanoforge.export import export  # here: `--help` answers without loading torch

    hydra_setup.run(export, cfg)


if __name__ == "__main__":
    sys.argv = cli.check_command_line(sys.argv, "export")  # typos: one line, exit 2
    main()

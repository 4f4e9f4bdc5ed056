"""Generate text from a checkpoint: ``python src/generate.py ckpt=PATH prompt="ROMEO:"``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

import hydra
from omegaconf import DictConfig

from nanoforge import cli, hydra_setup

hydra_setup.setup()


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    from nanoforge.inference import generate  # here: `--help` answers without loading torch

    hydra_setup.settle_imports()  # the import-time objects: no garbage collection walks them

    hydra_setup.run(generate, cfg)


if __name__ == "__main__":
    sys.argv = cli.check_command_line(sys.argv, "generate")  # typos: one line, exit 2
    main()

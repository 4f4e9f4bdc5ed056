"""Train a GPT: ``python src/train.py model=small`` (see configs/train.yaml for every option)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

import hydra
from omegaconf import DictConfig

from nanoforge import hydra_setup

hydra_setup.setup()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return hydra_setup.run_task(cfg, "train")


if __name__ == "__main__":
    sys.argv = hydra_setup.expand_resume(sys.argv)  # resume=RUN_DIR continues a run in place
    main()

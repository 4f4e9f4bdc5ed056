"""Train a GPT: ``python src/train.py model=small`` (see configs/train.yaml for every option)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

import hydra
from omegaconf import DictConfig

from nanoforge import cli, hydra_setup

hydra_setup.setup()


def train_job(cfg: DictConfig) -> float | None:
    """One training run. In a sweep, the job also gets its share of the machine and returns
    the value the sweeper ranks (``optimized_metric``); alone, it just trains."""
    # imported here, not at the top: `--help` and `--cfg job` answer without loading torch
    from nanoforge import sweep
    from nanoforge.training import train

    hydra_setup.settle_imports()  # the import-time objects: no garbage collection walks them
    if cfg.get("print_config", True):
        from nanoforge.console import print_config_tree

        print_config_tree(cfg)
    with sweep.job_scope(cfg):  # in a sweep: the job's GPU or threads, its DDP ranks' dir
        metrics = train(cfg)
    return sweep.objective(metrics, cfg.get("optimized_metric") or "val/loss")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return hydra_setup.run(train_job, cfg)


if __name__ == "__main__":
    sys.argv = cli.expand_resume(sys.argv)  # resume=RUN_DIR continues a run in place
    sys.argv = cli.check_command_line(sys.argv, "train")  # typos: one line, exit 2
    from nanoforge.slurm import wants_sweep

    if wants_sweep(sys.argv):  # hydra/launcher=slurm without -m: submit it as a one-job sweep
        sys.argv.insert(1, "-m")
    main()

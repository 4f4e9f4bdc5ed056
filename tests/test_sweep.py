"""nanoforge.sweep: what only a sweep (``-m``) needs.

assign_resources gives each of n parallel jobs its GPU or its share of CPU threads; objective
is the value a job returns to the sweeper (a diverged job fails, in a sweep only); job_scope
sets a sweep's job up (resources, the command line Lightning's DDP ranks re-run) and undoes it
afterwards; hydra/launcher=slurm composes into submitit's sbatch script.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

from nanoforge import sweep
from nanoforge.errors import UserError
from tests.helpers import compose


def test_assign_resources_gpu_by_job_number_or_cpu_share(monkeypatch, cfg_factory):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(sweep, "cpu_cores", lambda: 8)
        monkeypatch.setattr(sweep, "gpu_count", lambda: 0)
        cfg = cfg_factory()
        assert sweep.assign_resources(cfg, job_num=3, n_parallel=4) == {"threads": 2}
        assert torch.get_num_threads() == 2 and cfg.trainer.devices == "auto"
        assert cfg.threads == 2  # what training applies again
        # threads=N asks for fewer than the share, never more
        for asked, got in ((1, 1), (6, 2)):
            cfg = cfg_factory(f"threads={asked}")
            assert sweep.assign_resources(cfg, job_num=0, n_parallel=4) == {"threads": got}
            assert torch.get_num_threads() == got

        monkeypatch.setattr(sweep, "gpu_count", lambda: 4)
        for job, gpu in [(0, 0), (5, 1), (7, 3)]:
            cfg = cfg_factory()
            assert sweep.assign_resources(cfg, job_num=job, n_parallel=4) == {"gpu": gpu}
            assert cfg.trainer.accelerator == "gpu" and list(cfg.trainer.devices) == [gpu]

        for trainer in ("ddp_cpu", "fsdp"):  # multi-process jobs start their own processes
            with pytest.raises(UserError, match="re-running src/train.py"):
                sweep.assign_resources(cfg_factory(f"trainer={trainer}"), job_num=0, n_parallel=2)
    finally:
        torch.set_num_threads(before)


def test_sweep_objective_fails_a_diverged_job_only_in_a_sweep():
    assert sweep.objective({"val/loss": 2.5}, "val/loss", multirun=True) == 2.5
    assert math.isnan(sweep.objective({"val/loss": math.nan}, "val/loss", multirun=False))
    for bad in ({"val/loss": math.nan}, {"val/loss": math.inf}, {}):
        with pytest.raises(FloatingPointError, match="diverged"):
            sweep.objective(bad, "val/loss", multirun=True)


# --------------------------------------------------------------------------- job_scope
@pytest.fixture
def sweep_job(hydra_config, tmp_path):
    """``sweep_job(*overrides, mode=...)``: the config of job 1 of a sweep (or of a single
    run), with HydraConfig set as inside that job."""

    def make(*overrides: str, mode=RunMode.MULTIRUN):
        cfg = compose(["model=tiny", "optim.lr=0.01", *overrides], return_hydra_config=True)
        with read_write(cfg.hydra):
            cfg.hydra.mode = mode
            cfg.hydra.job.num = 1
            cfg.hydra.run.dir = str(tmp_path / "single")
            cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "1")
        return cfg, hydra_config(cfg)

    return make


def test_job_scope_points_ddp_ranks_at_the_job_and_undoes_it(sweep_job, monkeypatch):
    """Lightning's DDP launcher starts ranks 1..N-1 with `sys.argv` + `hydra.run.dir`: inside
    the job they are the job's own overrides, a single run, and the job's directory."""
    argv = ["train.py", "-m", "model=tiny,small", "optim.lr=0.01"]
    monkeypatch.setattr(sys, "argv", list(argv))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    cfg, hc = sweep_job()
    with sweep.job_scope(cfg) as scoped:
        assert scoped is cfg
        assert sys.argv == ["train.py", *hc.overrides.task, "hydra.mode=RUN"]
        assert "model=tiny" in sys.argv and "model=tiny,small" not in sys.argv
        assert hc.run.dir == hc.runtime.output_dir
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", "1234"  # as DDP does
    assert sys.argv == argv
    assert hc.run.dir == str(OmegaConf.select(cfg, "hydra.run.dir"))
    # the next job of the sweep starts its own process group
    assert "MASTER_ADDR" not in os.environ and os.environ["MASTER_PORT"] == "29500"


def test_job_scope_gives_a_parallel_job_its_threads_and_leaves_a_single_run_alone(
    sweep_job, monkeypatch
):
    monkeypatch.setattr(sweep, "cpu_cores", lambda: 8)
    monkeypatch.setattr(sweep, "gpu_count", lambda: 0)
    before = torch.get_num_threads()
    cfg, _ = sweep_job("hydra/launcher=parallel", "hydra.launcher.n_jobs=2")
    with sweep.job_scope(cfg):
        assert torch.get_num_threads() == 4  # 8 cores, 2 jobs at once
    assert torch.get_num_threads() == before

    argv = ["train.py", "model=tiny"]
    monkeypatch.setattr(sys, "argv", list(argv))
    cfg, hc = sweep_job("hydra/launcher=parallel", "hydra.launcher.n_jobs=2", mode=RunMode.RUN)
    with sweep.job_scope(cfg) as scoped:
        assert scoped is cfg and sys.argv == argv and torch.get_num_threads() == before
        assert hc.run.dir != hc.runtime.output_dir


# --------------------------------------------------------------------------- SLURM
def fake_srun_on_path(tmp_path, monkeypatch) -> None:
    """submitit's SlurmExecutor looks for `srun` before it writes an sbatch script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_launcher_config_composes_into_an_sbatch_script(tmp_path, monkeypatch, hydra_config):
    """hydra/launcher=slurm -> hydra-submitit-launcher's SlurmLauncher -> submitit's own
    parameter check and sbatch script: nodes from trainer.num_nodes, one task per GPU."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=8",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.setup=[module load cuda]",
            f"paths.log_dir={tmp_path}/logs",
        ],
        return_hydra_config=True,
    )
    hydra_config(cfg)  # the launcher's config resolves ${hydra:...}
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 8, 8)
    assert params["submitit_folder"].startswith(f"{tmp_path}/logs/train/multiruns/")

    # the same translation the plugin makes before it submits (submitit_launcher.launch)
    fake_srun_on_path(tmp_path, monkeypatch)
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=tmp_path / "sub",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python src/train.py", "0")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "module load cuda",
    ):
        assert line in script, script


def test_a_corrupt_optuna_study_file_is_one_line_before_the_sweep(tmp_path, capsys):
    cfg = compose(["hparams_search=optuna", f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    sweep.check_study_storage(cfg)  # no file yet: Optuna creates it
    (tmp_path / "optuna.db").write_bytes(b"not a database, " * 300)
    with pytest.raises(SystemExit) as e:
        sweep.check_study_storage(cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"the Optuna study file {tmp_path / 'optuna.db'} is not a readable SQLite" in err

"""Sweeps: multirun jobs and their report, Optuna, the parallel launcher, SLURM, experiments."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nanoforge import report
from tests.conftest import CONFIGS, ROOT, make_text, run_entry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# a few seconds per job: tiny model, small generated corpus, 6 steps, 2 validation batches
FAST = [
    "model=tiny",
    "data=text",
    "data.path=corpus.txt",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "data.val_batches=2",
    "logger=none",
    "callbacks.text_samples.max_new_tokens=20",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_config=false",
]


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    return tmp_path


def sweep_dirs(cwd: Path, task: str = "train") -> list[Path]:
    return sorted((cwd / "logs" / task / "multiruns").glob("*"))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def compose_hydra(overrides: list[str]):
    """Compose with the hydra node (launcher, sweeper), as the entry point sees it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


# ---- the report, from sweep directories made by hand ---------------------------------------


def fake_job(sweep: Path, num: int, overrides: list[str], metrics=None, status=None) -> Path:
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), d / ".hydra" / "hydra.yaml")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (d / report.STATUS_FILE).write_text(json.dumps(status))
    return d


def metrics(loss: float, params: int, steps: int = 20) -> dict:
    return {
        "val/loss": loss,
        "val/bpc": loss / math.log(2),
        "best/val/loss": loss,
        "best/val/bpc": loss / math.log(2),
        "steps": steps,
        "tokens_seen": steps * 384,
        "num_params": params,
        "wall_seconds": 3.5,
        "train_tokens_per_sec": 1234.5,
        "history": [{"step": s, "val/loss": loss + 1 / s, "val/bpc": 0.0} for s in (10, 20)],
    }


def test_report_rows_for_ok_failed_diverged_and_unfinished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["model=tiny", "seed=1"], metrics(2.5, 100_000), {"status": "ok"})
    fake_job(
        sweep, 1, ["model=small", "seed=1"], None, {"status": "failed", "error": "UserError: x"}
    )
    fake_job(sweep, 2, ["model=medium", "seed=1"], metrics(float("nan"), 10_000_000))
    fake_job(sweep, 3, ["model=gpt2", "seed=1"])  # killed: nothing but Hydra's files
    fake_job(sweep, 10, ["model=small", "seed=1"], metrics(2.0, 800_000), {"status": "ok"})

    paths = report.write_report(sweep)

    rows = read_csv(paths["csv"])
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]  # numeric order
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "unfinished", "ok"]
    assert float(rows[0]["val_loss"]) == 2.5 and int(rows[4]["num_params"]) == 800_000
    assert rows[1]["note"] == "UserError: x"
    assert "diverged" in rows[2]["note"] and "killed" in rows[3]["note"]
    assert rows[0]["overrides"] == "model=tiny seed=1" and rows[0]["dir"] == "0"
    md = paths["md"].read_text()
    assert "5 jobs: 2 ok, 2 failed, 1 unfinished." in md
    assert "Overrides shared by every job: `seed=1`" in md
    assert "| 0 | `model=tiny` | ok | 100.00k | 20 | 7.68k | 2.5000 | 2.5000 |" in md
    assert "| 1 | `model=small` | **failed**: UserError: x |" in md
    assert "Best: job 10, val/loss 2.0000." in md
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_report_cli_rebuilds_and_explains_bad_directories(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["optim.lr=0.001"], metrics(2.5, 100_000))
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | `optim.lr=0.001` | ok |" in out and (sweep / "report.png").is_file()

    assert report.main([str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "holds no jobs" in capsys.readouterr().err


# ---- real sweeps, in subprocesses ------------------------------------------------------------


@pytest.mark.slow
def test_two_job_multirun_returns_val_loss_and_writes_the_report(workdir):
    r = run_entry("train.py", "-m", *FAST, "optim.lr=1e-3,3e-3", cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (sweep,) = sweep_dirs(workdir)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+", sweep.name)
    assert not (workdir / "logs" / "train" / "runs").exists()  # jobs live in the sweep dir

    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    for row, lr in zip(rows, ["0.001", "0.003"], strict=True):
        m = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert f"optim.lr={lr}" in row["overrides"]
        assert float(row["val_loss"]) == m["val/loss"] and math.isfinite(m["val/loss"])
        assert int(row["steps"]) == 6 and int(row["tokens_seen"]) == 6 * 12 * 32
        assert int(row["num_params"]) > 0 and float(row["tokens_per_sec"]) > 0
        assert float(row["best_val_loss"]) <= float(row["val_loss"])
        # the job returned its final val/loss to Hydra's sweeper
        status = json.loads((sweep / row["job"] / report.STATUS_FILE).read_text())
        assert status == {"status": "ok", "value": m["val/loss"]}
    md = (sweep / "report.md").read_text()
    assert md.count("| ok |") == 2 and "`optim.lr=0.001`" in md and "`optim.lr=0.003`" in md
    assert (sweep / "report.png").read_bytes().startswith(PNG_MAGIC)

    # rebuilt from the directory alone, the same rows
    (sweep / "report.csv").unlink()
    r2 = run_entry("report.py", str(sweep), cwd=workdir, timeout=60)
    assert r2.returncode == 0, r2.stderr
    assert read_csv(sweep / "report.csv") == rows
    assert "| 0 | `optim.lr=0.001` | ok |" in r2.stdout


@pytest.mark.slow
def test_parallel_launcher_runs_jobs_in_worker_processes_and_survives_a_failed_job(workdir):
    """hydra/launcher=parallel: 2 jobs at once on this CPU machine, 1 torch thread each. A job
    that fails (optim.lr=-1) is a failed row; the other job still finishes."""
    r = run_entry(
        "train.py",
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        *FAST,
        "optim.lr=1e-3,-1",
        cwd=workdir,
        timeout=240,
    )
    assert r.returncode == 1  # Hydra reports the failed job once every job has run
    assert "optim.lr must be > 0" in r.stderr
    (sweep,) = sweep_dirs(workdir)
    master_pid = int(sweep.name.rsplit("_", 1)[1])
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed")]
    assert math.isfinite(float(rows[0]["val_loss"]))
    assert "optim.lr must be > 0, got -1" in rows[1]["note"]

    pids = set()
    for job in ("0", "1"):
        log = (sweep / job / "train.log").read_text()
        m = re.search(r"job (\d) \(pid (\d+)\): 1 CPU thread\(s\), one of 2 parallel jobs", log)
        assert m and m.group(1) == job, log[-2000:]
        pids.add(int(m.group(2)))
    assert len(pids) == 2 and master_pid not in pids  # two worker processes, not the launcher


@pytest.mark.slow
def test_optuna_search_counts_a_failed_trial_and_goes_on(workdir):
    """hparams_search=optuna, 2 trials: TPE samples warmup, weight decay, dropout and depth
    from configs/hparams_search/optuna.yaml; lr is narrowed here to {0.001, -1} so that one
    trial fails (seed 1234 draws -1 first). The failure is a failed trial, the search
    goes on, and Optuna's best is the trial that trained."""
    r = run_entry(
        "train.py",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=1234",  # its first draw of lr is -1, its second 0.001
        "optim.lr=choice(0.001,-1)",
        *FAST,
        cwd=workdir,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (sweep,) = sweep_dirs(workdir)
    rows = read_csv(sweep / "report.csv")
    assert [(row["job"], row["status"]) for row in rows] == [("0", "failed"), ("1", "ok")]
    by_status = {row["status"]: row for row in rows}
    assert "optim.lr=-1" in by_status["failed"]["overrides"]
    assert "optim.lr=0.001" in by_status["ok"]["overrides"]
    for key in ("optim.warmup_steps", "optim.weight_decay", "model.dropout", "model.n_layer"):
        assert all(f"{key}=" in row["overrides"] for row in rows)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_params["optim.lr"] == 0.001
    assert best.best_value == pytest.approx(float(by_status["ok"]["val_loss"]))


# ---- configs -------------------------------------------------------------------------------


def test_optuna_config_searches_the_five_hyperparameters():
    cfg = compose_hydra(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"  # no -m needed
    assert set(sweeper.params) == {
        "optim.lr",
        "optim.warmup_steps",
        "optim.weight_decay",
        "model.dropout",
        "model.n_layer",
    }
    assert sweeper.direction == "minimize" and cfg.optimized_metric == "val/loss"
    assert sweeper.max_failure_rate == 1.0  # failed trials never stop the search


def test_parallel_launcher_config_uses_joblib_with_one_job_per_gpu_or_core():
    from nanoforge.hydra_setup import cpu_cores, gpu_count

    cfg = compose_hydra(["hydra/launcher=parallel"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == (gpu_count() or cpu_cores())


def test_assign_resources_gpu_by_job_number_or_cpu_share(monkeypatch, cfg_factory):
    import torch

    from nanoforge import sweep

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(sweep, "cpu_cores", lambda: 8)
        monkeypatch.setattr(sweep, "gpu_count", lambda: 0)
        cfg = cfg_factory()
        assert sweep.assign_resources(cfg, job_num=3, n_parallel=4) == {"threads": 2}
        assert torch.get_num_threads() == 2 and cfg.trainer.devices == "auto"

        monkeypatch.setattr(sweep, "gpu_count", lambda: 4)
        for job, gpu in [(0, 0), (5, 1), (7, 3)]:
            cfg = cfg_factory()
            assert sweep.assign_resources(cfg, job_num=job, n_parallel=4) == {"gpu": gpu}
            assert cfg.trainer.accelerator == "gpu" and list(cfg.trainer.devices) == [gpu]

        for trainer in ("ddp_cpu", "fsdp"):  # multi-process jobs start their own processes
            with pytest.raises(sweep.UserError, match="re-running src/train.py"):
                sweep.assign_resources(cfg_factory(f"trainer={trainer}"), job_num=0, n_parallel=2)
    finally:
        torch.set_num_threads(before)


def test_sweep_objective_fails_a_diverged_job_only_in_a_sweep():
    from nanoforge.sweep import objective

    assert objective({"val/loss": 2.5}, "val/loss", multirun=True) == 2.5
    assert math.isnan(objective({"val/loss": math.nan}, "val/loss", multirun=False))
    for bad in ({"val/loss": math.nan}, {"val/loss": math.inf}, {}):
        with pytest.raises(FloatingPointError, match="diverged"):
            objective(bad, "val/loss", multirun=True)


def fake_srun_on_path(tmp_path, monkeypatch) -> None:
    """submitit's SlurmExecutor looks for `srun` before it writes an sbatch script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_launcher_config_composes_into_an_sbatch_script(tmp_path, monkeypatch):
    """hydra/launcher=slurm -> hydra-submitit-launcher's SlurmLauncher -> submitit's own
    parameter check and sbatch script: nodes from trainer.num_nodes, one task per GPU."""
    import submitit
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_hydra(
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=8",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.setup=[module load cuda]",
            f"paths.log_dir={tmp_path}/logs",
        ]
    )
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # the launcher's config resolves ${hydra:...}
    try:
        launcher = instantiate(cfg.hydra.launcher)
    finally:
        HydraConfig.instance().cfg = saved
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


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="submitit's local executor: Linux")
def test_submitit_local_executor_runs_a_job(workdir):
    """The submitit launcher for real, with submitit's local executor (what SLURM would run,
    as a local subprocess): the job trains and the sweep report lists it."""
    r = run_entry(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        *FAST,
        cwd=workdir,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (sweep,) = sweep_dirs(workdir)
    assert list((sweep / ".submitit").glob("*/*_submitted.pkl"))  # it went through submitit
    (row,) = read_csv(sweep / "report.csv")
    assert row["status"] == "ok" and math.isfinite(float(row["val_loss"]))


def test_scaling_experiment_sweeps_sizes_at_a_fixed_token_budget():
    cfg = compose_hydra(["experiment=scaling"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    widths = str(params["model.n_embd"]).split(",")
    depths = str(params["model.n_layer"]).split(",")
    assert len(widths) >= 3 and len(depths) >= 2
    budgets = set()
    for w in widths:
        for d in depths:
            job = compose_hydra(["experiment=scaling", f"model.n_embd={w}", f"model.n_layer={d}"])
            assert job.model.n_embd % job.model.n_head == 0
            budgets.add(job.trainer.max_steps * job.data.batch_size * job.model.block_size)
    assert len(budgets) == 1  # every size sees the same number of training tokens


def test_every_experiment_composes_with_its_hydra_settings():
    names = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    assert {"baby_cpu", "shakespeare_char", "scaling"} <= set(names)
    for name in names:
        cfg = compose_hydra([f"experiment={name}"])
        assert cfg.task_name == name

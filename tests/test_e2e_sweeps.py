"""End to end: real sweeps (`python src/train.py -m ...`).

A multirun's jobs return their val/loss and the sweep writes its report; the parallel launcher
runs jobs in worker processes and survives a failed job; Optuna counts a failed trial and goes
on; the submitit launcher runs a job through submitit's local executor. A sweep with Hydra's
basic launcher runs its jobs in the sweep's own process, so those sweeps run in this process
(tests.helpers.run_main: the same command line, Hydra, sweeper and task runner); the launchers
that start processes, and sweeps running at once, run in subprocesses.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nanoforge import report
from tests.helpers import SRC, clean_env, make_text, read_csv, run_entry, run_main

pytestmark = pytest.mark.slow

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


def test_two_job_multirun_returns_val_loss_and_writes_the_report(workdir, monkeypatch, capsys):
    io = {"cwd": workdir, "monkeypatch": monkeypatch, "capsys": capsys}
    code, out, err = run_main("train.py", "-m", *FAST, "optim.lr=1e-3,3e-3", **io)
    assert code == 0, out[-2000:] + err[-3000:]
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
    code, out, err = run_main("report.py", str(sweep), **io)
    assert code == 0, err
    assert read_csv(sweep / "report.csv") == rows
    assert "| 0 | `optim.lr=0.001` | ok |" in out


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


def test_optuna_counts_a_failed_trial_and_keeps_continues_and_shares_its_study(
    workdir, monkeypatch, capsys
):
    """hparams_search=optuna, 2 trials: TPE samples warmup, weight decay, dropout and depth
    from configs/hparams_search/optuna.yaml; lr is narrowed here to {0.001, -1} so that one
    trial fails (seed 1234 draws -1 first). The failure is a failed trial, the search goes on,
    and Optuna's best is the trial that trained. The study lives in logs/optuna.db: two more
    sweep processes at once on the same search continue it (trial numbers go on), lose no
    trial and run none twice; the report shows the whole study."""
    args = [sys.executable, str(SRC / "train.py"), "hparams_search=optuna"]
    args += ["hydra.sweeper.sampler.seed=1234", "optim.lr=choice(0.001,-1)", *FAST]
    io = {"cwd": workdir, "monkeypatch": monkeypatch, "capsys": capsys}
    code, out, err = run_main(*args[1:], "hydra.sweeper.n_trials=2", **io)  # one sweep: here
    assert code == 0, out[-2000:] + err[-3000:]
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

    procs = [
        subprocess.Popen(
            [*args, "hydra.sweeper.n_trials=1"],
            cwd=workdir,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    import optuna

    study = optuna.load_study(study_name="train", storage=f"sqlite:///{workdir}/logs/optuna.db")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # none lost, none run twice
    for t in trials:  # each finished: trained (a finite value) unless its lr was -1
        trained = t.params["optim.lr"] == 0.001
        assert t.state.name == ("COMPLETE" if trained else "FAIL"), t
        assert not trained or math.isfinite(t.value)
    newest = sweep_dirs(workdir)[-1]
    assert "## The whole study: `train`" in (newest / "report.md").read_text()
    assert "4 trials in sqlite:///" in (newest / "report.md").read_text()

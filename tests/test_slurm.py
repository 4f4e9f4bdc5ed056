"""nanoforge.slurm and hydra/launcher=slurm. The unit tests run everywhere; the `slurm` tests
submit real jobs and need a cluster (`make test-slurm` starts one on this machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nanoforge import slurm
from tests.helpers import ROOT, clean_env, read_csv, run_entry, with_pythonpath


@pytest.mark.parametrize(
    ("accelerator", "devices", "gpus", "tasks"),
    [("cpu", 1, 0, 1), ("cpu", 2, 0, 2), ("auto", "auto", 0, 1), ("gpu", 1, 1, 1),
     ("gpu", -1, 1, 1), ("gpu", 4, 4, 4), ("cuda", [0, 1], 2, 2)],
)  # fmt: skip
def test_requests_follow_the_trainer(accelerator, devices, gpus, tasks):
    assert slurm.gpus_per_node(accelerator, devices) == gpus
    assert slurm.tasks_per_node(accelerator, devices, gpus) == tasks


def test_refusal_is_one_line_with_the_fix():
    err = (
        "sbatch: error: Invalid generic resource (gres) specification\n"
        "sbatch: error: Batch job submission failed: Invalid generic resource (gres) "
        "specification"
    )
    msg = slurm.refusal_message(err)
    assert "\n" not in msg
    assert "Invalid generic resource (gres) specification" in msg and "trainer=cpu" in msg


def test_one_run_on_slurm_is_a_one_job_sweep():
    assert slurm.wants_sweep(["train.py", "hydra/launcher=slurm"])
    assert not slurm.wants_sweep(["train.py", "-m", "hydra/launcher=slurm"])
    assert not slurm.wants_sweep(["train.py", "model=tiny"])


def test_requeued_checkpoint_is_the_newest(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    hpc, last = tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "checkpoints" / "last.ckpt"
    hpc.write_bytes(b"a")
    last.write_bytes(b"b")
    os.utime(hpc, (1, 1))
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert slurm.requeued_checkpoint(tmp_path) is None  # not requeued
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm.requeued_checkpoint(tmp_path) == str(last)


def _slurm_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (make test-slurm starts a local cluster)"
    conf = ROOT / ".slurm" / "slurm.conf"
    env = {**os.environ}
    if "SLURM_CONF" not in env and conf.is_file():
        env["SLURM_CONF"] = str(conf)
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
    if r.returncode != 0 or not any(s.startswith(("idle", "mix")) for s in r.stdout.split()):
        return "no idle SLURM node (make test-slurm starts a local cluster)"
    os.environ.setdefault("SLURM_CONF", env.get("SLURM_CONF", ""))
    return None


_reason = _slurm_up()

ARGS = [
    "trainer=ddp_cpu", "model=tiny", "trainer.max_steps=30", "trainer.val_check_interval=15",
    "print_config=false", "trainer.enable_progress_bar=false",
]  # fmt: skip


def _env():
    return with_pythonpath(ROOT)


def _weights(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(_reason is not None, reason=_reason or "")
def test_one_ddp_run_through_sbatch(tmp_path):
    """(a) a single run submitted as one 2-task job: one directory, both ranks, metrics.json,
    the same weights as the same run launched by Lightning on this machine."""
    probe = [
        "+callbacks.pace._target_=tests.slurm_probes.Pace",
        f"+callbacks.pace.out_dir={tmp_path}",
    ]
    r = run_entry(
        "train.py", "hydra/launcher=slurm", *ARGS, *probe, cwd=tmp_path, timeout=300, env=_env()
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0] != ".") == ["0"]
    starts = [json.loads(x) for x in (tmp_path / "starts.jsonl").read_text().splitlines()]
    assert sorted(s["rank"] for s in starts) == [0, 1] and {s["world_size"] for s in starts} == {2}
    assert json.loads((sweep / "0" / "metrics.json").read_text())["steps"] == 30
    (tmp_path / "ref").mkdir()
    ref = run_entry("train.py", *ARGS, cwd=tmp_path / "ref", timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    (run,) = (tmp_path / "ref" / "logs" / "train" / "runs").iterdir()
    a, b = (
        _weights(sweep / "0" / "checkpoints" / "last.ckpt"),
        _weights(run / "checkpoints" / "last.ckpt"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(_reason is not None, reason=_reason or "")
def test_sweep_of_two_slurm_jobs(tmp_path):
    """(b) -m with two values: two SLURM jobs (an array), both in the sweep report."""
    r = run_entry("train.py", "-m", "hydra/launcher=slurm", "trainer=cpu", "model=tiny",
                  "trainer.max_steps=10", "trainer.val_check_interval=10", "optim.lr=1e-3,2e-3",
                  "print_config=false", cwd=tmp_path, timeout=300, env=_env())  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    rows = read_csv(sweep / "report.csv")
    assert [(x["job"], x["status"]) for x in rows] == [("0", "ok"), ("1", "ok")]
    # one SLURM array, two jobs in it: submitit keeps <array>_0 and <array>_1
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if "_" in p.name and p.is_dir())
    assert len(jobs) == 2 and jobs[0].split("_")[0] == jobs[1].split("_")[0]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(_reason is not None, reason=_reason or "")
def test_preempted_job_is_requeued_and_ends_with_the_same_weights(tmp_path):
    """(c) scancel --signal=USR1: Lightning saves hpc_ckpt_1.ckpt and requeues the job; the
    requeued job resumes and ends with the weights of an uninterrupted run."""
    probe = [
        "+callbacks.pace._target_=tests.slurm_probes.Pace",
        f"+callbacks.pace.out_dir={tmp_path}",
        "+callbacks.pace.seconds=0.3",
    ]
    cmd = ["python", str(ROOT / "src" / "train.py"), "hydra/launcher=slurm", *ARGS, *probe]
    env = clean_env(_env())
    p = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for _ in range(120):
        if (tmp_path / "running").exists():
            break
        time.sleep(0.5)
    job = json.loads((tmp_path / "starts.jsonl").read_text().splitlines()[0])["job"]
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert (sweep / "0" / "hpc_ckpt_1.ckpt").is_file()
    starts = [json.loads(x) for x in (tmp_path / "starts.jsonl").read_text().splitlines()]
    assert {s["restart"] for s in starts} == {0, 1} and max(s["step"] for s in starts) > 0
    (tmp_path / "ref").mkdir()
    ref = run_entry("train.py", *ARGS, cwd=tmp_path / "ref", timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    (run,) = (tmp_path / "ref" / "logs" / "train" / "runs").iterdir()
    a, b = (
        _weights(sweep / "0" / "checkpoints" / "last.ckpt"),
        _weights(run / "checkpoints" / "last.ckpt"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

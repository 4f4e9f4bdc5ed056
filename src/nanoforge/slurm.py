"""What running on SLURM needs beyond hydra-submitit-launcher (``hydra/launcher=slurm``).

- **Requests that follow the trainer.** ``configs/hydra/launcher/slurm.yaml`` derives GPUs and
  tasks per node from ``trainer.accelerator``/``trainer.devices`` (:func:`gpus_per_node`,
  :func:`tasks_per_node`): no GPU request for ``trainer=cpu``/``ddp_cpu``, one task per device,
  as Lightning's ``SLURMEnvironment`` expects.
- **A refusal in one line.** ``hydra_plugins.nanoforge_launcher.SlurmLauncher`` (where Hydra
  looks for launchers) turns an ``sbatch`` refusal (submitit's
  ``FailedJobError``) into ``error: ...`` quoting SLURM's reason and the override that fixes it.
- **Job states without accounting.** submitit asks ``sacct`` for job states; a cluster without
  ``slurmdbd`` answers "Slurm accounting storage is disabled" on every call, and submitit
  warns each time. There the launcher asks ``squeue`` instead (:class:`SqueueWatcher`).
- **Requeued jobs resume.** Lightning's SLURM auto-requeue (``SIGUSR1``: save
  ``hpc_ckpt_N.ckpt`` in the run directory, ``scontrol requeue``) restarts the job from the
  top; :func:`requeued_checkpoint` finds the checkpoint it continues from.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_GPU = ("gpu", "cuda")


def _count(devices: Any) -> int | None:
    """Devices as a number: an int > 0, a list's length; None for -1/"auto" (all there are)."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices if devices > 0 else None
    if isinstance(devices, str):
        if devices.strip().lstrip("-").isdigit():
            return _count(int(devices))
        parts = [p for p in devices.split(",") if p.strip()]
        return len(parts) if len(parts) > 1 else None
    try:
        return len(devices)
    except TypeError:
        return None


def gpus_per_node(accelerator: Any, devices: Any) -> int:
    """GPUs to ask SLURM for per node: ``trainer.devices`` on a GPU trainer (1 when it is
    -1/auto: set ``hydra.launcher.gpus_per_node`` to use more), 0 otherwise (``cpu``, and
    ``auto``: ask for GPUs with trainer=gpu/ddp)."""
    if str(accelerator).lower() not in _GPU:
        return 0
    return _count(devices) or 1


def tasks_per_node(accelerator: Any, devices: Any, gpus: Any) -> int:
    """One task per device (Lightning starts no processes under SLURM: SLURM does)."""
    if str(accelerator).lower() in _GPU:
        return max(1, int(gpus or 1))
    return _count(devices) or 1


def cpus_per_task(num_workers: Any) -> int:
    """CPUs per task: the training process and its DataLoader workers (SLURM's default is 1,
    which DataLoader workers would share with training)."""
    return 1 + max(0, int(num_workers or 0))


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("slurm_gpus_per_node"):
        OmegaConf.register_new_resolver("slurm_gpus_per_node", gpus_per_node)
    if not OmegaConf.has_resolver("slurm_cpus_per_task"):
        OmegaConf.register_new_resolver("slurm_cpus_per_task", cpus_per_task)
    if not OmegaConf.has_resolver("slurm_tasks_per_node"):
        OmegaConf.register_new_resolver("slurm_tasks_per_node", tasks_per_node)


# SLURM's refusal -> the override that fixes it
_FIXES = (
    (
        "gres",
        "this cluster has no such GPUs: train on CPUs with trainer=cpu or trainer=ddp_cpu, or "
        "set hydra.launcher.gpus_per_node=N to what a node has",
    ),
    ("partition", "set hydra.launcher.partition=NAME to one of the partitions sinfo lists"),
    ("account", "set hydra.launcher.account=NAME (sacctmgr show assoc user=$USER)"),
    ("qos", "set hydra.launcher.qos=NAME to a QOS your account may use"),
    ("time limit", "lower hydra.launcher.timeout_min (minutes) to the partition's limit"),
    (
        "node configuration is not available",
        "ask for what one node has: lower hydra.launcher.tasks_per_node (= trainer.devices), "
        "hydra.launcher.cpus_per_task or hydra.launcher.mem_gb (sinfo -N -l shows a node)",
    ),
    ("memory", "lower hydra.launcher.mem_gb (null: the partition's default)"),
    (
        "processors",
        "lower hydra.launcher.cpus_per_task or hydra.launcher.tasks_per_node",
    ),
)


def refusal_message(stderr: str) -> str:
    """One line: SLURM's reason (its ``sbatch: error:`` lines) and the override that fixes it."""
    reasons = [
        line.split("error:", 1)[1].strip()
        for line in stderr.splitlines()
        if "error:" in line and "Batch job submission failed" not in line
    ]
    failed = [
        line.split("failed:", 1)[1].strip()
        for line in stderr.splitlines()
        if "Batch job submission failed:" in line
    ]
    lines = stderr.strip().splitlines()
    reason = "; ".join(dict.fromkeys(reasons + failed)) or (lines[-1] if lines else "unknown")
    text = reason.lower()
    fix = next(
        (hint for key, hint in _FIXES if key in text),
        "see configs/hydra/launcher/slurm.yaml for the hydra.launcher.* settings",
    )
    return f"sbatch refused the job: {reason}. Fix: {fix}"


def accounting_enabled() -> bool:
    """True when ``sacct`` can answer (the cluster runs slurmdbd or another storage)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: leave submitit as it is
    match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out, re.MULTILINE)
    return not (match and match.group(1).endswith("/none"))


@functools.cache
def _squeue_watcher_class():
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        """submitit's job-state watcher, asking ``squeue`` (which knows a finished job's state
        for the cluster's MinJobAge) instead of ``sacct``, for clusters without accounting."""

        def _make_command(self) -> list[str] | None:
            to_check = {x.split("_")[0] for x in self._registered - self._finished}
            if not to_check:
                return None
            return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N",
                    f"--jobs={','.join(sorted(to_check))}"]  # fmt: skip

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if not isinstance(string, str):
                string = string.decode()
            return super().read_info("JobID|State|NodeList\n" + string)

    return SqueueWatcher


def use_squeue_without_accounting() -> bool:
    """Point submitit's SLURM jobs at squeue when sacct cannot answer; True if it did."""
    from submitit.slurm.slurm import SlurmJob

    if accounting_enabled():
        return False
    watcher_class = _squeue_watcher_class()
    if not isinstance(SlurmJob.watcher, watcher_class):
        SlurmJob.watcher = watcher_class(delay_s=60)
    log.info("this cluster keeps no accounting (no sacct): job states come from squeue")
    return True


def requeued_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """In a SLURM job that was requeued (preempted, or Lightning's auto-requeue): the newest
    checkpoint of ``run_dir`` to continue from — Lightning's ``hpc_ckpt_N.ckpt`` or our
    ``checkpoints/last.ckpt`` (saved on the SIGTERM that ends a requeued job). None otherwise.
    """
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    run_dir = Path(run_dir)
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "checkpoints" / "last.ckpt"]
    found = [p for p in found if p.is_file()]
    if not found:
        return None
    return str(max(found, key=lambda p: p.stat().st_mtime_ns))


def wants_sweep(argv: list[str]) -> bool:
    """True when ``argv`` picks a submitting launcher (slurm, submitit_*) but not ``-m``:
    Hydra uses launchers for multiruns only and would otherwise train here, silently."""
    launcher = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("hydra/launcher=")]
    multirun = any(a in ("-m", "--multirun") for a in argv[1:]) or any(
        a.startswith("hparams_search=") for a in argv[1:]
    )
    return bool(launcher) and launcher[-1] in ("slurm", "submitit_slurm") and not multirun

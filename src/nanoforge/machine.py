"""The machine and the launcher, as this process sees them: cores, GPUs, how many sweep jobs
run at once, and which rank a launcher (torchrun, SLURM, Lightning's DDP) made this process.

A leaf: the standard library only (torch is imported inside :func:`gpu_count` and
:func:`pick_device`), so the Hydra resolvers that name run directories can call it before
torch loads.
"""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parallel_jobs() -> int:
    """Default number of jobs at once for ``hydra/launcher=parallel``: one per GPU, or one
    per CPU core when there is no GPU (each then trains with one thread)."""
    return gpu_count() or cpu_cores()


def launcher_rank() -> int:
    """Non-zero in any process that is not global rank 0 as its launcher set it up: torchrun
    (RANK), SLURM (SLURM_PROCID), a node other than the first (NODE_RANK, GROUP_RANK), or
    Lightning's DDP launcher for local ranks > 0 (LOCAL_RANK); 0 for a process nobody
    launched as a rank. (The value is the first non-zero of those, not always the global rank.)"""
    for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def run_stamp() -> str:
    """The run directory's name: ``<time>_<pid>``; under torchrun with ``--rdzv-id=ID``, the
    ID, so the processes of every node (started at other times, with other pids) agree."""
    import datetime

    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return run_id
    return f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


def rank_suffix() -> str:
    """The log-file suffix of a process that shares rank 0's run directory: ``_rank<R>`` for
    rank R > 0 of torchrun or srun, ``_node<N>`` for node N > 0 started with Lightning's
    NODE_RANK. (Lightning's DDP launcher names its own children's logs.)"""
    env = os.environ
    key = "SLURM_PROCID" if "SLURM_PROCID" in env else "RANK"
    if "TORCHELASTIC_RUN_ID" in env or key == "SLURM_PROCID":
        rank = env.get(key, "")
        return f"_rank{rank}" if rank.isdigit() and int(rank) > 0 else ""
    node = env.get("NODE_RANK", "")
    if "LOCAL_RANK" not in env and node.isdigit() and int(node) > 0:
        return f"_node{node}"
    return ""


def pick_device(name: str = "auto"):
    """The torch device ``device=`` names; ``auto``: a CUDA GPU, else Apple's MPS, else the CPU."""
    import torch

    from nanoforge.errors import UserError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"device={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device={name} but torch {torch.__version__} sees no CUDA GPU: use device=cpu "
            "(or auto), or install a CUDA build of torch (README: GPU machines)"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but this machine has no MPS: use device=cpu (or auto)")
    return device

"""CPU threads: how many torch computes with (the ``threads`` key), and how OpenMP's idle
threads wait.

PyTorch's CPU kernels run on an OpenMP thread pool, one thread per core by default. Between
two parallel regions (thousands per training step of a small model) GNU OpenMP's threads
*spin* for a while before sleeping. On a machine of its own that saves a wake-up; on a shared
one (a second training, a test suite, another user) the spinning threads take the cores the
working threads need, and a step that takes 70 ms can take 1.8 s. ``OMP_WAIT_POLICY=PASSIVE``
makes them sleep at once: measured in bench/RESULTS.md ("Threads on a shared machine") beside
a CPU-heavy neighbour and alone, which is why it is the default here.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it: :func:`set_wait_policy` runs in
every entry point before torch is imported (``hydra_setup.setup``). What the user exported
is kept. A leaf: no torch at import time.
"""

from __future__ import annotations

import os

from nanoforge.errors import UserError

WAIT_POLICY = "PASSIVE"


def set_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` (before torch is imported), unless the user set OpenMP's
    waiting already: ``OMP_WAIT_POLICY``, or GNU OpenMP's ``GOMP_SPINCOUNT`` (how long a
    thread spins; ``GOMP_SPINCOUNT=300000`` is what GNU OpenMP does when neither is set,
    which is how bench/threads.py runs the old default)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def check(threads) -> int | None:
    """``threads`` as given in a config: None (torch's default, one per core) or >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(
            f"threads={threads!r} is not a thread count: give a positive integer (e.g. "
            "threads=1), or threads=null for one per core"
        )
    return threads


def apply(threads, share: int | None = None) -> int:
    """Set torch's CPU threads: ``threads`` (None: one per core), capped at ``share`` (a
    parallel sweep job's part of the cores). Returns the count in use."""
    import torch

    n = check(threads)
    if share is not None:
        n = min(n, share) if n is not None else share
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()

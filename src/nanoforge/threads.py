"""CPU threads: how many torch computes with (the ``threads`` key), and how long OpenMP's
idle threads spin.

PyTorch's CPU kernels run on an OpenMP thread pool, one thread per core by default. Between
two parallel regions (thousands per training step of a small model) GNU OpenMP's threads
*spin* (300,000 iterations) before sleeping. On a machine of its own that saves a wake-up; on
a shared one (a second training, a test suite, another user) the spinning threads take the
cores the working threads need, and a step can become tens of times slower. Sleeping at once
(``OMP_WAIT_POLICY=PASSIVE``) removes the collapse but makes every parallel region pay a
wake-up, a clear loss on an idle machine. Spinning 1,000 iterations
(``GOMP_SPINCOUNT=1000``) is the compromise that measured best overall: a little slower than
GNU's default alone, close to PASSIVE beside a neighbour, where the default collapsed
(figures: bench/RESULTS.md, "What each idea is worth"), so it is the default here;
``GOMP_SPINCOUNT=300000`` brings GNU's back on a machine of your own.

GNU OpenMP (the one in PyPI's Linux wheels of torch) reads these once, when torch loads it:
:func:`set_wait_policy` runs in every entry point before torch is imported
(``hydra_setup.setup``). What the user exported is kept. A leaf: no torch at import time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from nanoforge.errors import UserError

SPIN_COUNT = "1000"


def set_wait_policy() -> None:
    """``GOMP_SPINCOUNT=1000`` (before torch is imported), unless the user set OpenMP's
    waiting already: ``OMP_WAIT_POLICY`` (``PASSIVE``: sleep at once; ``ACTIVE``: spin) or
    ``GOMP_SPINCOUNT`` itself (``300000`` is GNU OpenMP's own default, how bench/threads.py
    runs the old behaviour)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


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


# Widths (n_embd) at most this sample one sequence faster on one thread than on many.
NARROW = 256


@contextmanager
def decoding(width: int, device, rows: int = 1) -> Iterator[None]:
    """Torch on one CPU thread while a model of ``width`` <= :data:`NARROW` samples ``rows``
    = 1 sequence one token at a time; the thread count as it was, after.

    Decoding one sequence runs each layer on a single new token: at width 256 the largest
    product inside a block (the MLP's 256 x 1024) is ~0.26M multiply-adds, tens of
    microseconds on one core, about what waking a second thread for half of it costs; and with
    ``GOMP_SPINCOUNT=1000`` (:func:`set_wait_policy`) the idle threads are asleep by the next of
    the token's many small kernels. (The output head is wider with a large vocabulary, but it
    is one kernel of many.) ``python bench/generation.py --threads`` measures it
    (bench/RESULTS.md, "What each idea is worth"): one thread samples model=tiny and
    model=small faster than two; at width 384 and 768 (model=medium, GPT-2) the two are even,
    so wider models keep every thread. Measured on 2 cores only: the threshold is where
    splitting stopped paying there, and more cores only add threads to wake. Many rows
    (``num_samples``) make every product as many times larger and keep every thread too; on
    a GPU this does nothing.

    ``device``: a resolved device (a ``torch.device``, or a string such as ``"cpu"`` or
    ``"cuda:0"``), not ``"auto"``.
    """
    import torch

    before = torch.get_num_threads()
    narrow = rows == 1 and width <= NARROW and before > 1 and torch.device(device).type == "cpu"
    if narrow:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if narrow:
            torch.set_num_threads(before)

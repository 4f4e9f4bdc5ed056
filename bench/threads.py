"""Threads on a shared machine: a `model=small` run's step time alone and beside a CPU-heavy
neighbour (another `model=small` training), with the old and the new defaults.

    python bench/threads.py               # what `make bench` runs
    python bench/threads.py --steps 60

Defaults compared (nanoforge.threads):

- old: one torch thread per core, GNU OpenMP's own waiting (idle threads spin 300,000
  iterations before sleeping); run with ``GOMP_SPINCOUNT=300000``, which is that default
  spelled out and which nanoforge leaves alone;
- new: one thread per core, idle threads spin 1,000 iterations (``GOMP_SPINCOUNT=1000``), what
  every entry point sets unless the user chose;
- ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once), the other candidate;
- new with ``threads=1``.

Each measured run: ``python src/train.py model=small trainer.max_steps=N``, no logger, no text
samples, one validation at the end; its step time is the median wall time between the ends of
consecutive optimizer steps after the first 5 (bench/steptimer.py). The neighbour, started
first and killed after, is the same training with many more steps, in the same mode as the
measured run (two users of one machine with the same defaults).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

from compare import BENCH_ENV, machine, run, step_timer, train_cmd

OLD = {"GOMP_SPINCOUNT": "300000"}
NEW: dict[str, str] = {}
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
QUIET = ["logger=none", "callbacks.text_samples.max_new_tokens=0"]
CASES = [  # (name, env, extra overrides, with a neighbour)
    ("alone, old default", OLD, [], False),
    ("alone, new default", NEW, [], False),
    ("alone, OMP_WAIT_POLICY=PASSIVE", PASSIVE, [], False),
    ("alone, threads=1", NEW, ["threads=1"], False),
    ("beside a neighbour, old default (both)", OLD, [], True),
    ("beside a neighbour, new default (both)", NEW, [], True),
    ("beside a neighbour, OMP_WAIT_POLICY=PASSIVE (both)", PASSIVE, [], True),
    ("beside a neighbour, threads=1 (new default neighbour)", NEW, ["threads=1"], True),
]


def step_ms(path: Path, skip: int = 5) -> float:
    perf = json.loads(path.read_text())["perf"][skip:]
    return 1000 * statistics.median(b - a for a, b in itertools.pairwise(perf))


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **BENCH_ENV, "PYTHONUNBUFFERED": "1", **extra}


def measured(work: Path, name: str, env: dict, extra: list[str], steps: int) -> float:
    timer = work / f"{name}.json"
    over = ["model=small", f"trainer.max_steps={steps}", *QUIET, *extra, *step_timer(timer)]
    run(train_cmd(over, work / name), cwd=work, env={**BENCH_ENV, **env})
    return step_ms(timer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="steps of each measured run")
    args = ap.parse_args()
    # the bench's own environment must not choose for the programs it starts
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ.pop("GOMP_SPINCOUNT", None)
    print(f"# threads on a shared machine, {date.today()}, {machine()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nanoforge-threads-") as tmp:
        work = Path(tmp)
        run(train_cmd(["model=small", "trainer.max_steps=1", *QUIET], work / "warm"), cwd=work)
        for k, (name, env, extra, neighbour) in enumerate(CASES):
            proc = None
            if neighbour:
                over = ["model=small", "trainer.max_steps=1000000", *QUIET]
                proc = subprocess.Popen(
                    train_cmd(over, work / f"neighbour{k}"),
                    cwd=work,
                    env=clean_env(env),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                time.sleep(12)  # past its imports: training when the measured run starts
            try:
                ms = measured(work, f"case{k}", env, extra, args.steps)
            finally:
                if proc is not None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            rows.append((name, ms))
            print(f"[threads] {name}: {ms:.1f} ms per step", flush=True)
    by = dict(rows)
    print("\n| `model=small`, batch 12 | median ms per step |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    old_busy = by["beside a neighbour, old default (both)"]
    new_busy = by["beside a neighbour, new default (both)"]
    old_alone, new_alone = by["alone, old default"], by["alone, new default"]
    print(
        f"\nbeside a neighbour: new default {new_busy:.1f} ms vs old {old_busy:.1f} ms per step "
        f"= {old_busy / new_busy:.1f}x faster; alone: new {new_alone:.1f} ms vs old "
        f"{old_alone:.1f} ms ({new_alone / old_alone:.2f}x the old time; goal: no collapse "
        "beside a neighbour, nothing lost alone)"
    )


if __name__ == "__main__":
    main()

"""Start-up: how long our entry points take as whole processes, beside the bare imports they
cannot avoid.

    python bench/startup.py              # 5 rounds (what `make bench` runs)
    python bench/startup.py --rounds 9
    python bench/startup.py --phases     # where a 1-step run's time goes, stage by stage

Programs, each a fresh process timed from launch to exit, in rounds whose order rotates (so
that drift on a shared machine hits all alike); medians reported:

- ``import torch``               python -c "import torch"
- ``import lightning.pytorch``   python -c "import lightning.pytorch"
- ``import lightning.pytorch, frozen``   the same, then ``gc.freeze()``: the import without
            the 1.1 s its interpreter exit spends walking the import-time objects, which our
            entry points freeze (``hydra_setup.settle_imports``). Not a goal's reference: it
            shows how much of a ratio that exit is.
- train     ``python src/train.py model=small trainer.max_steps=1``: a whole 1-step run on the
            embedded plays (its token file already made by an untimed first run, as for every
            run but a corpus's first): Hydra composition, data, model, Trainer, one step, one
            validation (20 batches) with its text sample (300 tokens), the checkpoints, the
            summary. "train, no eval work": the same with one validation batch and no sample,
            what the framework itself costs around one step.
- generate  ``python src/generate.py ckpt=RUN max_new_tokens=1``: load the checkpoint, the GPT
            and the tokenizer, one token out (the per-token cost is bench/generation.py's).
- eval      ``python src/eval.py ckpt=RUN data=text data.path=SMALL``: rebuild the run's
            DataModule on a 50 kB slice of the plays (so that scoring is not what is timed),
            score it, write eval.json.

Goals (issue 15): generate <= 1.5x ``import torch`` (it must not import Lightning); train and
eval <= 1.2x ``import lightning.pytorch`` (which they need: LightningModule, DataModule).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

from compare import ROOT, machine, run, train_cmd

FROZEN_IMPORT = "import gc, lightning.pytorch; gc.freeze()"
NO_EVAL_WORK = ["data.val_batches=1", "callbacks.text_samples.max_new_tokens=0"]
GOALS = {  # program: (reference program, most it may take as a multiple of it)
    "generate": ("import torch", 1.5),
    "train": ("import lightning.pytorch", 1.2),
    "eval": ("import lightning.pytorch", 1.2),
}


def commands(work: Path, i: int) -> dict[str, list[str]]:
    py, src = sys.executable, ROOT / "src"
    run_dir = work / "warm"
    return {
        "import torch": [py, "-c", "import torch"],
        "import lightning.pytorch": [py, "-c", "import lightning.pytorch"],
        # the same, its objects frozen as our entry points freeze theirs: no exit walk
        "import lightning.pytorch, frozen": [py, "-c", FROZEN_IMPORT],
        "train": train_cmd(["model=small", "trainer.max_steps=1"], work / f"train{i}"),
        # the same run without its work past the first step: one validation batch, no sample
        "train, no eval work": train_cmd(
            ["model=small", "trainer.max_steps=1", *NO_EVAL_WORK], work / f"lean{i}"
        ),
        "generate": [py, str(src / "generate.py"), f"ckpt={run_dir}", "max_new_tokens=1"],
        "eval": [
            py,
            str(src / "eval.py"),
            f"ckpt={run_dir}",
            "data=text",
            f"data.path={work / 'small.txt'}",
            f"output={work / f'eval{i}.json'}",
        ],
    }


def phases(overrides: list[str]) -> None:
    """``--phases``: one 1-step run of src/train.py in this process, with the time (wall and
    CPU) at which each stage starts and ends: where the seconds beyond the imports go."""
    import functools
    import runpy
    import time

    sys.path.insert(0, str(ROOT / "src"))
    from nanoforge.threads import set_wait_policy

    set_wait_policy()  # what hydra_setup.setup() does, but torch is imported below, before it
    t0 = time.perf_counter()
    marks: list[tuple[float, float, str]] = [(0.0, time.process_time(), "phases start")]

    def mark(name: str) -> None:
        marks.append((time.perf_counter() - t0, time.process_time(), name))

    def timed(owner, name: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def wrapper(*a, **k):
            mark(f"{owner.__name__}.{name} starts")
            try:
                return f(*a, **k)
            finally:
                mark(f"{owner.__name__}.{name} ends")

        setattr(owner, name, wrapper)

    import lightning.pytorch as pl

    mark("import lightning.pytorch done")
    from nanoforge import callbacks, training
    from nanoforge.data import TextDataModule

    mark("nanoforge imported")
    timed(training, "train")
    timed(training, "build")
    timed(TextDataModule, "setup")
    timed(pl.Trainer, "fit")
    timed(pl.Trainer, "save_checkpoint")
    timed(callbacks.TextSamples, "sample")
    timed(training, "_end")
    sys.argv = [str(ROOT / "src" / "train.py"), *overrides]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        mark("train.py returns")
        print("\n| seconds since start | CPU seconds | stage |\n|---|---|---|")
        for wall, cpu, name in marks:
            print(f"| {wall:.2f} | {cpu:.2f} | {name} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--phases",
        action="store_true",
        help="instead: one 1-step run in this process, timed stage by stage",
    )
    args = ap.parse_args()
    if args.phases:
        import os

        with tempfile.TemporaryDirectory(prefix="nanoforge-phases-") as tmp:
            over = ["model=small", "trainer.max_steps=1"]
            # untimed, in its own process: the token file, as for every run but the first
            run(train_cmd(over, Path(tmp) / "warm"), cwd=tmp)
            os.chdir(tmp)
            phases([*over, f"hydra.run.dir={tmp}/run"])
        return
    print(f"# start-up, {date.today()}, {machine()}", flush=True)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="nanoforge-startup-") as tmp:
        work = Path(tmp)
        # untimed: the token file and the converted plays (a corpus's first run), the run
        # whose checkpoint generate and eval load, and the slice eval scores
        run(train_cmd(["model=small", "trainer.max_steps=1"], work / "warm"), cwd=work)
        plays = next((work / "data" / "cache").glob("shakespeare-plays-*.txt"))
        (work / "small.txt").write_text(plays.read_text(encoding="utf-8")[:50_000])
        names = list(commands(work, 0))
        for name in names:  # untimed: every program once, so the page cache is warm
            run(commands(work, -1)[name], cwd=work)
        for i in range(args.rounds):
            cmds = commands(work, i)
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                r = run(cmds[name], cwd=work)
                times.setdefault(name, []).append(r.wall)
            print(
                f"[startup] round {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names),
                flush=True,
            )
    med = {n: statistics.median(v) for n, v in times.items()}
    print("\n| program | median seconds (launch to exit) | runs |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:.2f} | {', '.join(f'{t:.2f}' for t in times[n])} |")
    print("\n| ratio | measured | goal | met? |")
    print("|---|---|---|---|")
    for prog, (ref, goal) in GOALS.items():
        ratio = med[prog] / med[ref]
        print(
            f"| {prog} / {ref} | {ratio:.2f}x ({med[prog]:.2f} s / {med[ref]:.2f} s) | "
            f"<= {goal}x | {'yes' if ratio <= goal else 'no'} |"
        )
    light, frozen = med["import lightning.pytorch"], med["import lightning.pytorch, frozen"]
    lean = med["train, no eval work"]
    print(
        f"\ntrain beyond the Lightning import: {med['train'] - light:.2f} s as whole processes "
        f"(goal: under 1 s); without the validation's 20 batches and the sample: "
        f"{lean - light:.2f} s."
        f"\nOur entry points exit faster than the bare import: they freeze the import-time "
        f"objects (hydra_setup.settle_imports), which the bare import's exit walks "
        f"({light - frozen:.2f} s: `{FROZEN_IMPORT}` takes {frozen:.2f} s)."
        f"\nAgainst that frozen import, train is {med['train'] / frozen:.2f}x "
        f"({med['train'] - frozen:.2f} s beyond it), without the validation and the sample "
        f"{lean / frozen:.2f}x ({lean - frozen:.2f} s); eval {med['eval'] / frozen:.2f}x."
    )


if __name__ == "__main__":
    main()

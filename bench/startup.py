"""Start-up: how long our entry points take as whole processes, beside the bare imports they
cannot avoid.

    python bench/startup.py              # 5 rounds (what `make bench` runs)
    python bench/startup.py --rounds 9

Programs, each a fresh process timed from launch to exit, in rounds whose order rotates (so
that drift on a shared machine hits all alike); medians reported:

- ``import torch``               python -c "import torch"
- ``import lightning.pytorch``   python -c "import lightning.pytorch"
- train     ``python src/train.py model=small trainer.max_steps=1``: a whole 1-step run on the
            embedded plays (its token file already made by an untimed first run, as for every
            run but a corpus's first): Hydra composition, data, model, Trainer, one step, one
            validation with its text sample, the checkpoints, the summary.
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
        "train": train_cmd(["model=small", "trainer.max_steps=1"], work / f"train{i}"),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
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
    beyond = med["train"] - med["import lightning.pytorch"]
    print(f"\ntrain beyond the Lightning import: {beyond:.2f} s (goal: under 1 s)")


if __name__ == "__main__":
    main()

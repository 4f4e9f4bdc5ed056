"""nanoforge against nanoGPT on this machine: throughput, time to quality, overheads.

    python bench/compare.py                         # all sections (what `make bench` runs)
    python bench/compare.py --sections throughput --pairs 5
    NANOGPT_DIR=path/to/nanoGPT python bench/compare.py

1. throughput  nanoGPT's train.py and `python src/train.py` with the same model (4 layers,
               4 heads, width 128, context 64, no dropout, no biases, tied head, classic
               block), batch 12, tiny Shakespeare, the same number of steps, no evaluation
               after step 0. Training tokens/sec over the steps after a warm-up, measured the
               same way for both: the wall time between the ends of consecutive optimizer
               steps (nanoGPT prints it per iteration; ours comes from bench/steptimer.py).
               Median of --pairs alternating pairs (the order flips every pair).
2. quality     Wall time from launch to the first validation at or below --target (1.88) on
               tiny Shakespeare, for nanoGPT's README CPU command and `experiment=fast_cpu`.
               Both validate on 2400 random windows of 64 tokens from the last 10% of the
               text (nanoGPT: --eval_iters=200 batches of 12, new ones each time, instead of
               the README's 20; ours: 75 fixed batches of 32), enough windows for a small
               standard error (measured spread: bench/RESULTS.md, "2. Time to val/loss").
               A run is stopped as soon as it crosses the target.
3. overhead    `python src/train.py model=small` (the default run): launch to the end of the
               first optimizer step, peak resident memory, wall time and final val/bpc.

nanoGPT: a karpathy/nanoGPT checkout outside this repository, prepared with
bench/prepare_nanogpt.py, given by NANOGPT_DIR; without it the nanoGPT parts are skipped.
The corpus: TINYSHAKESPEARE (default ../shared/data/tinyshakespeare/input.txt next to the
repository). Nothing is downloaded. Run outputs go to a temporary folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BATCH, BLOCK = 12, 64
MODEL_ARGS = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
# nanoGPT's README CPU command (its train.py defaults: bias=False, beta2 from the config)
NANOGPT_README = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    f"--block_size={BLOCK}",
    f"--batch_size={BATCH}",
    *MODEL_ARGS[:3],
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]


def with_args(base: list[str], **changes) -> list[str]:
    """nanoGPT arguments with some --key=value replaced (or appended)."""
    out = [a for a in base if a.lstrip("-").split("=")[0] not in changes]
    return out + [f"--{k}={v}" for k, v in changes.items()]


VAL_BATCHES = 200
THREAD_ENV: dict[str, str] = {}  # --threads N: OMP_NUM_THREADS=N for every program


@dataclass
class Run:
    """One process: its output lines with the seconds since launch, peak RSS, exit code."""

    cmd: list[str]
    lines: list[tuple[float, str]] = field(default_factory=list)
    launched_at: float = 0.0  # time.time() just before the process started
    wall: float = 0.0
    maxrss_mb: float = 0.0
    returncode: int | None = None
    stopped_early: bool = False


def run(cmd, cwd, env=None, stop=None, timeout=900.0) -> Run:
    """Run ``cmd``; ``stop(line)`` returning True ends the process right there (SIGKILL)."""
    r = Run(cmd=[str(c) for c in cmd])
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **THREAD_ENV, **(env or {})}
    e.pop("HYDRA_FULL_ERROR", None)
    r.launched_at = time.time()
    t0 = time.perf_counter()
    p = subprocess.Popen(
        r.cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in p.stdout:
            now = time.perf_counter() - t0
            r.lines.append((now, line.rstrip("\n")))
            if stop is not None and stop(line):
                r.stopped_early = True
                p.kill()
                break
            if now > timeout:
                p.kill()
                raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(r.cmd)}")
    finally:
        p.stdout.close()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    r.wall = time.perf_counter() - t0
    r.returncode = p.returncode
    r.maxrss_mb = usage.ru_maxrss / 1024  # Linux reports KiB
    if r.returncode != 0 and not r.stopped_early:
        tail = "\n".join(line for _, line in r.lines[-30:])
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(r.cmd)}\n{tail}")
    return r


def nanogpt_cmd(args: list[str], out_dir: Path) -> list[str]:
    return [sys.executable, "train.py", *args, f"--out_dir={out_dir}"]


def train_cmd(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]


def ours_cmd(overrides: list[str], run_dir: Path, data: Path) -> list[str]:
    return train_cmd(["data=tinyshakespeare", f"data.path={data}", *overrides], run_dir)


def step_timer(path: Path) -> list[str]:
    return [
        "+callbacks.step_timer._target_=steptimer.StepTimer",
        f"+callbacks.step_timer.path={path}",
    ]


BENCH_ENV = {"PYTHONPATH": str(BENCH)}  # makes bench/steptimer.py importable for Hydra


# --- 1. throughput -----------------------------------------------------------------------

NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def nanogpt_tokens_per_sec(r: Run, warmup: int) -> float:
    dts = [float(m[2]) / 1000 for _, ln in r.lines if (m := NANOGPT_ITER.match(ln))]
    timed = dts[warmup + 1 :]  # iteration 0 includes the step-0 evaluation
    return len(timed) * BATCH * BLOCK / sum(timed)


def ours_tokens_per_sec(path: Path, warmup: int) -> float:
    perf = json.loads(path.read_text())["perf"]
    timed_steps = len(perf) - warmup
    return timed_steps * BATCH * BLOCK / (perf[-1] - perf[warmup - 1])


def throughput(args, work: Path, data: Path, nanogpt: Path | None) -> list[str]:
    steps, warm = args.steps, args.warmup
    ours_over = [
        "model=small",
        "model.bias=false",
        f"data.batch_size={BATCH}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps * 10}",
    ]
    cmd_ours = ours_cmd(ours_over, Path("RUN_DIR"), data)
    # evaluation at iteration 0 only (1 batch), before the timed window
    ng_args = with_args(NANOGPT_README, max_iters=steps, eval_interval=steps * 10, eval_iters=1)
    out = [
        "### 1. Throughput at equal settings",
        "",
        f"4/4/128, context {BLOCK}, batch {BATCH}, no dropout, no biases, tied head, classic "
        f"block, fp32; {steps} steps, the first {warm} not timed; no evaluation in the window.",
        "",
        f"- ours: `{' '.join(cmd_ours[1:])}` (+ bench/steptimer.py)",
    ]
    if nanogpt is None:
        print("[throughput] NANOGPT_DIR not set: nanoGPT skipped, ours only", flush=True)
        out.append("- nanoGPT: skipped (NANOGPT_DIR not set)")
    else:
        out.append(
            f"- nanoGPT: `{' '.join(nanogpt_cmd(ng_args, Path('OUT'))[1:])}` (in NANOGPT_DIR)"
        )
    ours, theirs = [], []
    for i in range(args.pairs):
        order = ("nanogpt", "ours") if i % 2 == 0 else ("ours", "nanogpt")
        for who in order:
            if who == "nanogpt" and nanogpt is not None:
                r = run(nanogpt_cmd(ng_args, work / f"ng_tp{i}"), cwd=nanogpt)
                theirs.append(nanogpt_tokens_per_sec(r, warm))
                print(f"[throughput] pair {i + 1} nanoGPT: {theirs[-1]:,.0f} tok/s", flush=True)
            elif who == "ours":
                timer = work / f"ours_tp{i}.json"
                run(
                    ours_cmd([*ours_over, *step_timer(timer)], work / f"ours_tp{i}", data),
                    cwd=work,
                    env=BENCH_ENV,
                )
                ours.append(ours_tokens_per_sec(timer, warm))
                print(f"[throughput] pair {i + 1} ours:    {ours[-1]:,.0f} tok/s", flush=True)
    out += ["", "| pair | nanoGPT tok/s | ours tok/s | ours / nanoGPT |", "|---|---|---|---|"]
    for i, o in enumerate(ours):
        t = theirs[i] if theirs else None
        out.append(
            f"| {i + 1} | {f'{t:,.0f}' if t else '—'} | {o:,.0f} | "
            f"{f'{o / t:.2f}x' if t else '—'} |"
        )
    mo = statistics.median(ours)
    if theirs:
        mt = statistics.median(theirs)
        ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
        out.append(
            f"| **median** | **{mt:,.0f}** | **{mo:,.0f}** | "
            f"**{statistics.median(ratios):.2f}x** (ratio of medians {mo / mt:.2f}x) |"
        )
    else:
        out.append(f"| **median** | — | **{mo:,.0f}** | — |")
    return out


# --- 2. time to quality ------------------------------------------------------------------

NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
OURS_EVAL = re.compile(r"step (\d+)(?:/\d+)?: val/loss=([\d.]+)")  # "step 150/150: val/loss=..."


def crossing(r: Run, pattern: re.Pattern, loss_group: int, target: float):
    """(seconds since launch, step, loss) of the first validation <= target, or None; and
    every validation seen."""
    evals = [(t, int(m[1]), float(m[loss_group])) for t, ln in r.lines if (m := pattern.search(ln))]
    hit = next((e for e in evals if e[2] <= target), None)
    return hit, evals


def quality(args, work: Path, data: Path, nanogpt: Path | None) -> list[str]:
    target = args.target
    ng_args = with_args(NANOGPT_README, eval_iters=VAL_BATCHES)  # README's 20 -> 200
    ours_over = ["experiment=fast_cpu"]  # validates on 75 x 32 windows = 200 x 12
    out = [
        f"### 2. Time to val/loss <= {target}",
        "",
        f"Validation on {VAL_BATCHES * BATCH} random windows of {BLOCK} tokens from the last 10% "
        "of tiny Shakespeare for both (standard error ~0.005); wall time from launch (imports, "
        "data loading, evaluations included) to the printed validation line.",
        "",
        f"- ours: `{' '.join(ours_cmd(ours_over, Path('RUN_DIR'), data)[1:])}`",
    ]
    if nanogpt is not None:
        out.append(
            f"- nanoGPT: `{' '.join(nanogpt_cmd(ng_args, Path('OUT'))[1:])}` (in NANOGPT_DIR; "
            f"the README command with --eval_iters={VAL_BATCHES} instead of 20)"
        )
    else:
        print("[quality] NANOGPT_DIR not set: nanoGPT skipped, ours only", flush=True)
        out.append("- nanoGPT: skipped (NANOGPT_DIR not set)")
    rows = []
    for i in range(args.quality_pairs):
        order = ("ours", "nanogpt") if i % 2 == 0 else ("nanogpt", "ours")
        for who in order:
            if who == "nanogpt" and nanogpt is not None:

                def stop(line):
                    m = NANOGPT_EVAL.match(line)
                    return bool(m) and float(m[3]) <= target

                r = run(nanogpt_cmd(ng_args, work / f"ng_q{i}"), cwd=nanogpt, stop=stop)
                hit, evals = crossing(r, NANOGPT_EVAL, 3, target)
                results = [(r, hit, evals, None)]
            elif who == "ours":
                # not stopped at the crossing: the run ends after its one validation, and its
                # checkpoint is then scored on the whole validation split (the record's rule).
                # Run --ours-runs times (same seed, same losses): a short run's time varies on
                # a shared machine, the median is the record's time
                results = []
                for j in range(args.ours_runs):
                    run_dir = work / f"ours_q{i}_{j}"
                    r = run(ours_cmd(ours_over, run_dir, data), cwd=work)
                    hit, evals = crossing(r, OURS_EVAL, 2, target)
                    results.append((r, hit, evals, whole_split_loss(run_dir, work)))
            else:
                continue
            for r, hit, evals, whole in results:
                last = evals[-1] if evals else None
                rows.append((i + 1, who, hit, last, r.wall, whole))
                what = (
                    f"{hit[2]:.4f} at step {hit[1]} after {hit[0]:.1f}s"
                    if hit
                    else f"not reached; last {last[2]:.4f} at step {last[1]}, run {r.wall:.1f}s"
                )
                if who == "ours":
                    what += f"; whole validation split (src/eval.py): {whole:.4f}"
                print(f"[quality] pair {i + 1} {who}: {what}", flush=True)
    out += [
        "",
        "| pair | program | first val/loss <= target | at step | seconds from launch | "
        "whole validation split |",
        "|---|---|---|---|---|---|",
    ]
    for pair, who, hit, last, wall, whole in rows:
        split = f"{whole:.4f}" if whole is not None else "—"
        if hit:
            out.append(f"| {pair} | {who} | {hit[2]:.4f} | {hit[1]} | {hit[0]:.1f} | {split} |")
        else:
            out.append(
                f"| {pair} | {who} | not reached (last {last[2]:.4f}) | {last[1]} | "
                f"> {wall:.1f} (whole run) | {split} |"
            )
    ours_t = [h[0] for _, w, h, _, _, _ in rows if w == "ours" and h]
    ng_rows = [(h, wall) for _, w, h, _, wall, _ in rows if w == "nanogpt"]
    wholes = [x for _, w, _, _, _, x in rows if w == "ours"]
    if wholes:
        ok = all(x <= target for x in wholes)
        out.append(
            f"\nwhole-split score of every record checkpoint <= {target}: "
            f"{'yes' if ok else 'NO'} ({', '.join(f'{x:.4f}' for x in wholes)})"
        )
    if ours_t and ng_rows:
        mo = statistics.median(ours_t)
        goal = (
            f"(goal: <= {args.speedrun_goal}x; ours the median of the {len(ours_t)} of "
            f"{args.ours_runs * args.quality_pairs} runs that reached it, "
            f"{min(ours_t):.1f}-{max(ours_t):.1f}s)"
        )
        if all(h for h, _ in ng_rows):
            mt = statistics.median(h[0] for h, _ in ng_rows)
            out.append(
                f"\n**speedrun: ours / nanoGPT = {mo:.1f}s / {mt:.1f}s = {mo / mt:.2f}x** {goal}"
            )
        else:  # nanoGPT never got there: its time is longer than its whole run
            mt = statistics.median(wall for _, wall in ng_rows)
            out.append(
                f"\n**speedrun: ours / nanoGPT < {mo:.1f}s / {mt:.1f}s = {mo / mt:.2f}x** {goal} "
                f"(nanoGPT did not reach {target} within its {mt:.1f}s run: its time is longer "
                "than that)"
            )
    return out


EVAL_LINE = re.compile(r"val/loss=([\d.]+)")


def whole_split_loss(run_dir: Path, work: Path) -> float:
    """``python src/eval.py ckpt=RUN_DIR``: the run's best checkpoint over the whole
    validation split of its corpus."""
    cmd = [sys.executable, str(ROOT / "src" / "eval.py"), f"ckpt={run_dir}"]
    r = run(cmd, cwd=work)
    return float(next(m[1] for _, ln in r.lines if (m := EVAL_LINE.search(ln))))


# --- 3. overheads ------------------------------------------------------------------------

FINAL = re.compile(r"step (\d+)(?:/\d+)?: val/loss=([\d.]+) val/bpc=([\d.]+)")


def overhead(args, work: Path, data: Path, nanogpt: Path | None) -> list[str]:
    rows = []
    for i in range(args.overhead_runs):
        timer = work / f"ours_oh{i}.json"
        r = run(
            train_cmd(["model=small", *step_timer(timer)], work / f"ours_oh{i}"),
            cwd=work,
            env=BENCH_ENV,
        )
        first = json.loads(timer.read_text())["step_ends"][0] - r.launched_at
        finals = [FINAL.search(ln) for _, ln in r.lines]
        last = [m for m in finals if m][-1]
        rows.append((first, r.maxrss_mb, r.wall, int(last[1]), float(last[3])))
        print(
            f"[overhead] run {i + 1}: first step {first:.1f}s after launch, peak RSS "
            f"{r.maxrss_mb:.0f} MB, wall {r.wall:.1f}s, val/bpc {last[3]} at step {last[1]}",
            flush=True,
        )
    out = [
        "### 3. Overheads of `python src/train.py model=small`",
        "",
        "(the default run: embedded Shakespeare, 2000 steps; + bench/steptimer.py)",
        "",
        "| run | launch to first optimizer step | peak RSS | wall time | final val/bpc |",
        "|---|---|---|---|---|",
    ]
    for i, (first, rss, wall, _step, bpc) in enumerate(rows):
        out.append(f"| {i + 1} | {first:.1f} s | {rss:.0f} MB | {wall:.1f} s | {bpc:.4f} |")
    if len(rows) > 1:
        out.append(
            f"| **median** | **{statistics.median(r[0] for r in rows):.1f} s** | "
            f"**{statistics.median(r[1] for r in rows):.0f} MB** | "
            f"**{statistics.median(r[2] for r in rows):.1f} s** | |"
        )
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    threads = (
        f"OMP_NUM_THREADS={THREAD_ENV['OMP_NUM_THREADS']} for every program (--threads)"
        if THREAD_ENV
        else f"{torch.get_num_threads()} torch threads by default"
    )
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads}, "
        f"Python {platform.python_version()}{load}"
    )


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="throughput,quality,overhead")
    ap.add_argument("--pairs", type=int, default=3, help="throughput: alternating pairs")
    ap.add_argument("--steps", type=int, default=300, help="throughput: steps per run")
    ap.add_argument("--warmup", type=int, default=50, help="throughput: untimed first steps")
    ap.add_argument("--quality-pairs", type=int, default=1)
    ap.add_argument("--ours-runs", type=_at_least_one, default=3, help="quality: our runs per pair")
    ap.add_argument("--overhead-runs", type=int, default=1)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--speedrun-goal", type=float, default=0.15, help="quality: the ratio aimed at")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every program (default: each program's own choice)",
    )
    args = ap.parse_args()
    if args.threads:
        THREAD_ENV["OMP_NUM_THREADS"] = str(args.threads)
    data = Path(os.environ.get("TINYSHAKESPEARE", DEFAULT_DATA)).resolve()
    ng = os.environ.get("NANOGPT_DIR")
    nanogpt = Path(ng).resolve() if ng else None
    if nanogpt is not None and not (nanogpt / "data" / "shakespeare_char" / "train.bin").is_file():
        sys.exit(
            f"error: {nanogpt} has no data/shakespeare_char/train.bin; run "
            f"python bench/prepare_nanogpt.py {nanogpt} {data}"
        )
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    where = machine()
    print(f"# nanoforge vs nanoGPT, {date.today()}, {where}", flush=True)
    report = [f"## nanoforge vs nanoGPT — {date.today()}", "", f"Machine: {where}", ""]
    with tempfile.TemporaryDirectory(prefix="nanoforge-bench-") as tmp:
        work = Path(tmp)
        for name, fn in (("throughput", throughput), ("quality", quality)):
            if name in sections:
                if not data.is_file():
                    print(f"[{name}] skipped: no tiny Shakespeare at {data} (TINYSHAKESPEARE=)")
                    continue
                report += [*fn(args, work, data, nanogpt), ""]
        if "overhead" in sections:
            report += [*overhead(args, work, data, nanogpt), ""]
        shutil.rmtree(work / "data", ignore_errors=True)
    print("\n" + "\n".join(report), flush=True)


if __name__ == "__main__":
    main()

"""A sweep's report: one row per job, as a markdown table, a CSV and a plot.

Written into the sweep directory (``logs/train/multiruns/<time>_<pid>/``) by the Hydra
callback ``nanoforge.sweep.SweepReport`` after every job and at the end of the multirun, and
rebuilt for any sweep directory with ``python src/report.py SWEEP_DIR``:

    report.md    the table (the overrides that differ between jobs; the shared ones above it)
    report.csv   the same rows, every override, full precision
    report.png   validation loss against step for every job | final loss against parameters

Each job directory holds ``.hydra/overrides.yaml`` (written by Hydra at its start),
``metrics.json`` (written by ``nanoforge.callbacks.RunSummary`` when training ends) and
``job_status.json`` (written by ``SweepReport`` when the job ends, with its error if it
failed). A job without a finite final ``val/loss`` is a row marked ``failed``, with the reason;
a job with no result at all yet is ``unfinished`` (still running, or killed).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nanoforge import overrides as ov
from nanoforge.errors import UserError
from nanoforge.io import atomic_write_bytes, read_json, shown

STATUS_FILE = "job_status.json"
STUDY_FILE = "optuna_study.json"  # an Optuna search's whole study (nanoforge.sweep)
CSV_FIELDS = [
    "job",
    "status",
    "overrides",
    "num_params",
    "steps",
    "tokens_seen",
    "val_loss",
    "best_val_loss",
    "val_bpc",
    "best_val_bpc",
    "val_bpb",
    "best_val_bpb",
    "wall_seconds",
    "tokens_per_sec",
    "note",
    "dir",
]


@dataclass
class JobRow:
    """One job of a sweep, as the report shows it."""

    job: int | str
    dir: Path
    overrides: list[str]
    status: str = "failed"  # "ok", "failed", or "unfinished" (still running, or killed)
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def metric(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    @property
    def history(self) -> list[dict]:
        return list(self.metrics.get("history") or [])


def _job_number(job_dir: Path, sweep_dir: Path) -> int | str:
    try:
        num = OmegaConf.select(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml"), "hydra.job.num")
        if num is not None:
            return int(num)
    except Exception:  # no readable hydra.yaml: fall back on the directory name
        pass
    rel = job_dir.relative_to(sweep_dir).as_posix()
    return int(rel) if rel.isdigit() else rel


def read_job(job_dir: Path, sweep_dir: Path) -> JobRow:
    """One job directory -> its row (never raises for a broken or unfinished job)."""
    try:
        recorded = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        overrides = [str(o) for o in OmegaConf.to_container(recorded)]  # as written
    except Exception:  # unreadable or half-written: the row still shows the job
        overrides = []
    row = JobRow(_job_number(job_dir, sweep_dir), job_dir, overrides)
    status = read_json(job_dir / STATUS_FILE) or {}
    metrics = read_json(job_dir / "metrics.json")
    if metrics is not None:
        row.metrics = metrics
    if status.get("status") == "failed" and status.get("error"):
        row.note = str(status["error"])
    elif metrics is not None and metrics.get("status", "finished") != "finished":
        row.note = str(
            metrics.get("error") or f"{metrics['status']} at step {metrics.get('steps')}"
        )
    elif metrics is None and not status:
        row.status, row.note = "unfinished", "no result yet: still running, or killed"
    elif metrics is None:
        row.note = "no metrics.json: training did not finish"
    elif row.metric("val/loss") is None:
        row.note = f"diverged: final val/loss is {metrics.get('val/loss')}"
    else:
        row.status = "ok"
    return row


def collect(sweep_dir: str | os.PathLike) -> list[JobRow]:
    """Every job of the sweep in ``sweep_dir``, in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(
            f"{sweep_dir} is not a directory. Pass a sweep directory such as "
            "logs/train/multiruns/<time>_<pid>."
        )
    job_dirs = sorted({p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")})
    job_dirs = [d for d in job_dirs if d != sweep_dir]
    if not job_dirs:
        raise UserError(
            f"{sweep_dir} holds no jobs (no */.hydra/overrides.yaml). Pass the directory of a "
            "multirun (python src/train.py -m ...), e.g. logs/train/multiruns/<time>_<pid>."
        )
    rows = [read_job(d, sweep_dir) for d in job_dirs]
    return sorted(rows, key=lambda r: (isinstance(r.job, str), r.job))


def _split_overrides(rows: list[JobRow]) -> tuple[list[str], dict[int, list[str]]]:
    """Overrides shared by every job, and for each row the ones that differ."""
    sets = [set(r.overrides) for r in rows]
    common = set.intersection(*sets) if sets and len(rows) > 1 else set()
    shared = [o for o in rows[0].overrides if o in common] if rows else []
    return shared, {i: [o for o in r.overrides if o not in common] for i, r in enumerate(rows)}


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _si(value: float | None) -> str:
    if value is None:
        return "—"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.2f}{suffix}"
    return f"{value:.0f}"


def markdown(rows: list[JobRow], sweep_dir: Path) -> str:
    shared, varying = _split_overrides(rows)
    ok = [r for r in rows if r.status == "ok"]
    lines = [f"# Sweep report: `{sweep_dir.name}`", ""]
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "unfinished")}
    lines.append(
        f"{len(rows)} jobs: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "unfinished")
        + "."
    )
    if shared:
        lines.append("Overrides shared by every job: `" + " ".join(shared) + "`.")
    lines.append("")
    head = (
        "| job | overrides | status | params | steps | tokens | val/loss | best val/loss "
        "| val/bpc | val/bpb | wall | tokens/s |"
    )
    lines += [head, "|" + "---|" * head.count(" | ") + "---|"]
    for i, r in enumerate(rows):
        ov = " ".join(varying[i]) or "(none)"
        status = r.status if r.status == "ok" else f"**{r.status}**: {r.note}"
        wall = r.metric("wall_seconds")
        lines.append(
            f"| {r.job} | `{ov}` | {status} | {_si(r.metric('num_params'))} "
            f"| {_fmt(r.metric('steps'), '.0f')} | {_si(r.metric('tokens_seen'))} "
            f"| {_fmt(r.metric('val/loss'), '.4f')} | {_fmt(r.metric('best/val/loss'), '.4f')} "
            f"| {_fmt(r.metric('val/bpc'), '.4f')} | {_fmt(r.metric('val/bpb'), '.4f')} "
            f"| {_fmt(wall, '.1f')}{' s' if wall else ''} "
            f"| {_fmt(r.metric('train_tokens_per_sec'), ',.0f')} |"
        )
    if ok:
        best = min(ok, key=lambda r: r.metric("val/loss"))
        lines += ["", f"Best: job {best.job}, val/loss {best.metric('val/loss'):.4f}."]
    lines += ["", "![val loss per step and final loss per swept key](report.png)", ""]
    lines += study_markdown(read_json(sweep_dir / STUDY_FILE))
    return "\n".join(lines)


def study_markdown(study: dict | None) -> list[str]:
    """The whole Optuna study (this sweep and every earlier run of the same search)."""
    if not study or not study.get("trials"):
        return []
    trials = study["trials"]
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    states = {}
    for t in trials:
        states[t["state"].lower()] = states.get(t["state"].lower(), 0) + 1
    lines = [
        f"## The whole study: `{study['study_name']}`",
        "",
        f"{len(trials)} trials in {study['storage']}: "
        + ", ".join(f"{n} {s}" for s, n in states.items())
        + ".",
    ]
    if done:
        best = min(done, key=lambda t: t["value"])
        params = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in best["params"].items()
        )
        lines.append(f"Best: trial {best['number']}, value {best['value']:.4f}, `{params}`.")
    lines.append("")
    return lines


def to_csv(rows: list[JobRow], sweep_dir: Path) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                "job": r.job,
                "status": r.status,
                "overrides": " ".join(r.overrides),
                "num_params": r.metrics.get("num_params"),
                "steps": r.metrics.get("steps"),
                "tokens_seen": r.metrics.get("tokens_seen"),
                "val_loss": r.metrics.get("val/loss"),
                "best_val_loss": r.metrics.get("best/val/loss"),
                "val_bpc": r.metrics.get("val/bpc"),
                "best_val_bpc": r.metrics.get("best/val/bpc"),
                "val_bpb": r.metrics.get("val/bpb"),
                "best_val_bpb": r.metrics.get("best/val/bpb"),
                "wall_seconds": r.metrics.get("wall_seconds"),
                "tokens_per_sec": r.metrics.get("train_tokens_per_sec"),
                "note": r.note,
                "dir": r.dir.relative_to(sweep_dir).as_posix(),
            }
        )
    return buf.getvalue()


def swept_keys(rows: list[JobRow]) -> dict[str, list[str | None]]:
    """The keys whose value differs between jobs, each with every job's value (as written)."""
    per_job = [{ov.key(o): ov.value(o) for o in r.overrides if "=" in o} for r in rows]
    keys = list(dict.fromkeys(k for d in per_job for k in d))
    return {k: [d.get(k) for d in per_job] for k in keys if len({d.get(k) for d in per_job}) > 1}


def _number(value: str | None) -> float | None:
    try:
        x = float(value) if value is not None else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def _panels(rows: list[JobRow]) -> list[tuple[str, list[Any]]]:
    """What the final loss is plotted against: the parameter count when model size varies
    (a scaling sweep), and each other swept key (at most three panels)."""
    from_size = len({r.metric("num_params") for r in rows if r.metric("num_params")}) > 1
    panels: list[tuple[str, list[Any]]] = []
    if from_size:
        panels.append(("parameters", [r.metric("num_params") for r in rows]))
    for key, values in swept_keys(rows).items():
        if from_size and key.split(".")[0].split("/")[0] == "model":
            continue  # the parameter count says it on a numeric axis
        numbers = [_number(v) for v in values]
        panels.append((key, numbers if all(n is not None for n in numbers) else values))
    if not panels:
        panels.append(("parameters", [r.metric("num_params") for r in rows]))
    return panels[:3]


def _log_axis(key: str, xs: list[float]) -> bool:
    """Log scale for rate-like keys (lr, weight decay, ...) and for values spanning > 5x."""
    positive = [x for x in xs if x and x > 0]
    if len(positive) != len(xs) or not xs:
        return False
    rate_like = key.rsplit(".", 1)[-1].endswith(("lr", "weight_decay", "eps"))
    return rate_like or max(xs) > 5 * min(xs)


def plot(rows: list[JobRow]) -> bytes:
    """PNG: validation loss per step for every job | final val/loss against each swept key
    (against the parameter count when model size varies)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

    _, varying = _split_overrides(rows)
    panels = _panels(rows)
    fig = Figure(figsize=(6 * (1 + len(panels)), 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    curves, *finals = fig.subplots(1, 1 + len(panels))
    for i, r in enumerate(rows):
        pts = [
            (h["step"], h["val/loss"])
            for h in r.history
            if isinstance(h.get("val/loss"), int | float) and math.isfinite(h["val/loss"])
        ]
        if not pts:
            continue
        label = f"{r.job}: {' '.join(varying[i]) or '(no overrides)'}"
        if r.status != "ok":
            label += f" ({r.status})"
        curves.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=label)
    curves.set(xlabel="step", ylabel="val/loss", title="validation loss")
    curves.grid(alpha=0.3)
    if curves.lines and len(curves.lines) <= 16:
        curves.legend(fontsize=7)
    for ax, (key, values) in zip(finals, panels, strict=True):
        ok = [
            (r, x)
            for r, x in zip(rows, values, strict=True)
            if r.status == "ok" and x is not None and r.metric("val/loss") is not None
        ]
        title = "final loss vs. parameters" if key == "parameters" else f"final loss vs. {key}"
        ax.set(xlabel=key, ylabel="final val/loss", title=title)
        ax.grid(alpha=0.3, which="both")
        if not ok:
            continue
        xs = [x for _, x in ok]
        ys = [r.metric("val/loss") for r, _ in ok]
        numeric = all(isinstance(x, int | float) for x in xs)
        if not numeric:  # categorical: one slot per value, in the order the sweep gave them
            slots = list(dict.fromkeys(xs))
            xs = [slots.index(x) for x in xs]
            ax.set_xticks(range(len(slots)), slots, rotation=20 if len(slots) > 4 else 0)
        ax.scatter(xs, ys, zorder=3)
        for (r, _), x, y in zip(ok, xs, ys, strict=True):
            ax.annotate(str(r.job), (x, y), textcoords="offset points", xytext=(4, 4))
        if numeric and _log_axis(key, xs):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if numeric:  # 800k parameters; 0.001 for a learning rate (not "1 m")
            ax.xaxis.set_major_formatter(
                EngFormatter() if key == "parameters" else FuncFormatter(lambda v, _: f"{v:g}")
            )
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def end_of_sweep(rows: list[JobRow], sweep_dir: str | os.PathLike) -> str:
    """The block a sweep ends with, once for all its jobs: how many finished, the best job
    (its own overrides and final val/loss), where the report is, and what to run next."""
    sweep = shown(sweep_dir)
    ok = [r for r in rows if r.status == "ok"]
    lines = [f"sweep finished: {len(rows)} jobs, {len(ok)} ok"]
    if ok:
        best = min(ok, key=lambda r: r.metric("val/loss"))
        _, varying = _split_overrides(rows)
        own = " ".join(varying[rows.index(best)]) or "(the same overrides as every job)"
        lines.append(f"  best      job {best.job}: {own}  val/loss {best.metric('val/loss'):.4f}")
    lines.append(f"  report    {sweep}/report.md (+ .csv, .png)")
    lines.append("next:")
    if ok:
        lines.append(f"  python src/generate.py ckpt={shlex.quote(shown(best.dir))}")
    lines.append(f"  tensorboard --logdir {shlex.quote(sweep)}")
    return "\n".join(lines)


def write_report(sweep_dir: str | os.PathLike) -> dict[str, Path]:
    """Collect the sweep and (re)write report.md, report.csv and report.png in it."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    out = {name: sweep_dir / f"report.{name}" for name in ("md", "csv", "png")}
    atomic_write_bytes(out["md"], markdown(rows, sweep_dir).encode("utf-8"))
    atomic_write_bytes(out["csv"], to_csv(rows, sweep_dir).encode("utf-8"))
    atomic_write_bytes(out["png"], plot(rows))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python src/report.py SWEEP_DIR``: rebuild the report and print its table."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Rebuild report.md, report.csv and report.png for a sweep directory.",
    )
    parser.add_argument("sweep_dir", help="e.g. logs/train/multiruns/2026-11-24_10-00-00_4242")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.sweep_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(encoding="utf-8"))
    print(f"wrote {paths['md']}, {paths['csv'].name}, {paths['png'].name}")
    return 0

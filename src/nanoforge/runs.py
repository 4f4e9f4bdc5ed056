"""Finding runs: every run directory under ``logs/`` newest first, the most recent one that
holds a checkpoint (``last`` in ``resume=last``, ``ckpt=last``, ``init_from=last``), and the
table ``python src/runs.py`` (``make runs``) prints: when each run started, its status
(finished, stopped, failed, or running: its lock is held, :mod:`nanoforge.rundir`), steps,
final val/loss, its directory and overrides.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from nanoforge import overrides as ov
from nanoforge.errors import UserError
from nanoforge.io import read_json
from nanoforge.rundir import is_running


def find_runs(log_dir: str | os.PathLike = "logs") -> list[Path]:
    """Every run directory under ``log_dir`` as ``configs/hydra/default.yaml`` lays them out
    (``<task>/runs/<time>``, ``<task>/multiruns/<time>/<job>``), most recently started first
    (a resume counts as a start: Hydra rewrites ``.hydra/config.yaml``)."""
    root = Path(log_dir)
    found = []
    for record in [
        *root.glob("*/runs/*/.hydra/config.yaml"),
        *root.glob("*/multiruns/*/*/.hydra/config.yaml"),
    ]:
        try:
            found.append((record.stat().st_mtime, record.parent.parent))
        except FileNotFoundError:  # removed meanwhile
            continue
    return [run for _, run in sorted(found, key=lambda t: t[0], reverse=True)]


def latest_run(log_dir: str | os.PathLike = "logs", holding=("last.ckpt",)) -> Path:
    """The most recently started run under ``log_dir`` that holds one of ``holding`` in its
    ``checkpoints/`` (``resume=last``, ``ckpt=last``)."""
    for run in find_runs(log_dir):
        if any((run / "checkpoints" / name).is_file() for name in holding):
            return run
    raise UserError(
        f"`last`: no run under {log_dir}/ has checkpoints/{' or '.join(holding)}. Pass a run "
        "directory instead (python src/runs.py lists them)."
    )


def say_last(run_dir: Path) -> None:
    """``last`` resolved: which run it chose, on stderr (stdout may be generated text)."""
    print(f"last = {run_dir} (the most recent run with a checkpoint)", file=sys.stderr, flush=True)


def run_status(run_dir: Path) -> tuple[str, dict]:
    """(finished | stopped | failed | running, the run's metrics.json or {})."""
    metrics = read_json(run_dir / "metrics.json") or {}
    if is_running(run_dir):
        return "running", metrics
    if metrics:
        return str(metrics.get("status", "finished")), metrics
    # no summary: killed (kill -9, power loss) or crashed; with a checkpoint it can resume
    return ("stopped" if (run_dir / "checkpoints" / "last.ckpt").is_file() else "failed"), {}


# what resume= adds to the overrides a run records (nanoforge.cli.expand_resume): internal,
# not what the user asked for
RESUME_OVERRIDES = ("hydra.run.dir", "ckpt_path")


def list_runs(log_dir: str | os.PathLike = "logs", limit: int = 20) -> str:
    """A table of the runs under ``log_dir``, most recently started (or resumed) first: when
    each first started and when it was last resumed, its status, steps, final val/loss, its
    directory and the overrides the user gave (not those ``resume=`` adds)."""
    rows = []
    for run in find_runs(log_dir)[:limit]:
        status, metrics = run_status(run)
        recorded = _overrides(run)
        last_start = (run / ".hydra" / "config.yaml").stat().st_mtime  # Hydra rewrites it
        resumed = any(ov.key(o) in RESUME_OVERRIDES for o in recorded)
        loss = metrics.get("val/loss")
        rows.append(
            (
                _when(_first_start(run) or last_start),
                _when(last_start) if resumed else "—",
                status,
                str(metrics.get("steps", "—")),
                f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "—",
                str(run),
                " ".join(o for o in recorded if ov.key(o) not in RESUME_OVERRIDES),
            )
        )
    if not rows:
        return f"no runs under {log_dir}/ (python src/train.py makes one)"
    head = ("started", "resumed", "status", "steps", "val/loss", "run", "overrides")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:6], widths, strict=True)) + "  " + r[6]
        for r in [head, *rows]
    )


def _overrides(run: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        recorded = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
        return [str(o) for o in recorded]
    except Exception:  # unreadable or half-written: the row still shows the run
        return []


def _first_start(run: Path) -> float | None:
    """When the run first started: the time on the first line of its ``train.log``, which
    every start of the run appends to (``[2026-12-06 13:33:28,233][...]``)."""
    try:
        with open(run / "train.log", encoding="utf-8", errors="replace") as f:
            first = f.readline()
        return time.mktime(time.strptime(first[1:20], "%Y-%m-%d %H:%M:%S"))
    except (OSError, ValueError):
        return None


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def main(argv: list[str] | None = None) -> int:
    """``python src/runs.py [LOG_DIR] [-n N]``: the runs and sweep jobs, newest first."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="runs.py", description="List training runs and sweep jobs, most recent first."
    )
    parser.add_argument("log_dir", nargs="?", default="logs", help="default: logs")
    parser.add_argument("-n", type=int, default=20, help="how many (default 20)")
    args = parser.parse_args(argv)
    print(list_runs(args.log_dir, args.n))
    return 0

"""nanoforge.report: a sweep's report, from the sweep directory alone.

One row per job (ok, failed with its error, diverged, unfinished), in report.md, report.csv
and report.png; ``python src/report.py SWEEP_DIR`` rebuilds it and explains a bad directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from nanoforge import report
from tests.helpers import read_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_job(sweep: Path, num: int, overrides: list[str], metrics=None, status=None) -> Path:
    """A job directory as Hydra, RunSummary and SweepReport leave it."""
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), d / ".hydra" / "hydra.yaml")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (d / report.STATUS_FILE).write_text(json.dumps(status))
    return d


def metrics(loss: float, params: int, steps: int = 20) -> dict:
    return {
        "val/loss": loss,
        "val/bpc": loss / math.log(2),
        "best/val/loss": loss,
        "best/val/bpc": loss / math.log(2),
        "steps": steps,
        "tokens_seen": steps * 384,
        "num_params": params,
        "wall_seconds": 3.5,
        "train_tokens_per_sec": 1234.5,
        "history": [{"step": s, "val/loss": loss + 1 / s, "val/bpc": 0.0} for s in (10, 20)],
    }


def test_report_rows_for_ok_failed_diverged_and_unfinished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["model=tiny", "seed=1"], metrics(2.5, 100_000), {"status": "ok"})
    fake_job(
        sweep, 1, ["model=small", "seed=1"], None, {"status": "failed", "error": "UserError: x"}
    )
    fake_job(sweep, 2, ["model=medium", "seed=1"], metrics(float("nan"), 10_000_000))
    fake_job(sweep, 3, ["model=gpt2", "seed=1"])  # killed: nothing but Hydra's files
    fake_job(sweep, 10, ["model=small", "seed=1"], metrics(2.0, 800_000), {"status": "ok"})
    # JSON, but not an object: the job did not finish as far as the report can tell
    fake_job(sweep, 11, ["model=tiny", "seed=1"], [1, 2], ["ok"])

    paths = report.write_report(sweep)

    rows = read_csv(paths["csv"])
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10", "11"]  # numeric order
    statuses = ["ok", "failed", "failed", "unfinished", "ok", "unfinished"]
    assert [r["status"] for r in rows] == statuses
    assert float(rows[0]["val_loss"]) == 2.5 and int(rows[4]["num_params"]) == 800_000
    assert rows[1]["note"] == "UserError: x"
    assert "diverged" in rows[2]["note"] and "killed" in rows[3]["note"]
    assert rows[0]["overrides"] == "model=tiny seed=1" and rows[0]["dir"] == "0"
    md = paths["md"].read_text()
    assert "6 jobs: 2 ok, 2 failed, 2 unfinished." in md
    assert "Overrides shared by every job: `seed=1`" in md
    assert "| 0 | `model=tiny` | ok | 100.00k | 20 | 7.68k | 2.5000 | 2.5000 |" in md
    assert "| 1 | `model=small` | **failed**: UserError: x |" in md
    assert "Best: job 10, val/loss 2.0000." in md
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_report_cli_rebuilds_and_explains_bad_directories(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["optim.lr=0.001"], metrics(2.5, 100_000))
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | `optim.lr=0.001` | ok |" in out and (sweep / "report.png").is_file()

    assert report.main([str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "holds no jobs" in capsys.readouterr().err


def test_the_plot_puts_final_loss_against_what_the_sweep_varied(tmp_path):
    def rows(*jobs):
        sweep = tmp_path / str(len(list(tmp_path.iterdir())))
        for i, (overrides, loss, params) in enumerate(jobs):
            fake_job(sweep, i, overrides, metrics(loss, params), {"status": "ok"})
        return report.collect(sweep)

    lr_sweep = rows(
        (["optim.lr=1e-4", "seed=1"], 2.9, 100_000),
        (["optim.lr=1e-3", "seed=1"], 2.4, 100_000),
        (["optim.lr=1e-2", "seed=1"], 2.6, 100_000),
    )
    assert report.swept_keys(lr_sweep) == {"optim.lr": ["1e-4", "1e-3", "1e-2"]}
    ((key, xs),) = report._panels(lr_sweep)
    assert key == "optim.lr" and xs == [1e-4, 1e-3, 1e-2]  # not every point at one x
    assert report._log_axis("optim.lr", xs) and not report._log_axis("seed", [1.0, 2.0])

    size_sweep = rows((["model=tiny"], 2.5, 100_000), (["model=small"], 2.0, 800_000))
    assert [k for k, _ in report._panels(size_sweep)] == ["parameters"]

    two_keys = rows(
        (["tokenizer=char", "optim.lr=1e-3"], 2.5, 1),
        (["tokenizer=bpe", "optim.lr=3e-3"], 2.2, 1),
    )
    panels = dict(report._panels(two_keys))
    assert panels == {"tokenizer": ["char", "bpe"], "optim.lr": [1e-3, 3e-3]}
    assert report.plot(two_keys).startswith(PNG_MAGIC)


def test_a_sweep_ends_with_one_block_naming_the_best_job(tmp_path, monkeypatch):
    """Each job printed its own four-command block; the sweep now ends with one."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "logs" / "train" / "multiruns" / "s"
    fake_job(sweep, 0, ["model=tiny", "optim.lr=1e-3"], metrics(2.5, 100), {"status": "ok"})
    fake_job(sweep, 1, ["model=tiny", "optim.lr=3e-3"], metrics(2.1, 100), {"status": "ok"})
    fake_job(sweep, 2, ["model=tiny", "optim.lr=1e-2"], None, {"status": "failed", "error": "x"})
    text = report.end_of_sweep(report.collect(sweep), sweep)
    assert text.splitlines() == [
        "sweep finished: 3 jobs, 2 ok",
        "  best      job 1: optim.lr=3e-3  val/loss 2.1000",
        "  report    logs/train/multiruns/s/report.md (+ .csv, .png)",
        "next:",
        "  python src/generate.py ckpt=logs/train/multiruns/s/1",
        "  tensorboard --logdir logs/train/multiruns/s",
    ]


def test_a_sweep_job_ends_without_its_own_next_commands(tmp_path):
    from nanoforge.console import end_of_run

    summary = {"status": "finished", "steps": 10, "wall_seconds": 3.0, "val/loss": 2.0}
    text = end_of_run(summary, tmp_path, "THESEUS:", next_steps=False)
    assert "next:" not in text and "tensorboard" not in text and "run dir" in text

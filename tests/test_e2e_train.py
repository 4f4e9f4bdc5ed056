"""End to end: the real `python src/train.py` in subprocesses, and what a run leaves behind."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import SRC, clean_env, make_text, run_dirs, run_entry, run_main, tb_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One short real training run on the embedded corpus, shared by the checks below."""
    cwd = tmp_path_factory.mktemp("train")
    r = run_entry(
        "train.py",
        "model=tiny",
        "trainer.max_steps=40",
        "trainer.val_check_interval=20",
        "data.val_batches=4",
        "callbacks.text_samples.max_new_tokens=80",
        cwd=cwd,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "Warning" not in r.stderr and "warning:" not in r.stdout  # a quiet console
    (run,) = run_dirs(cwd)
    run.joinpath("stdout.txt").write_text(r.stdout)
    return run


def test_run_directory_layout(trained_run):
    """What a run leaves (the callbacks' own files are specified in test_callbacks.py)."""
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    assert {p.name for p in (trained_run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert any((trained_run / "tensorboard").glob("*/events.out.tfevents.*"))
    out = (trained_run / "stdout.txt").read_text()
    log = (trained_run / "train.log").read_text()  # the same lines, for whoever tails the job
    assert "step 20/40: val/loss=" in log and "run finished: 40 steps" in log
    assert "Total FLOPs" not in out and "💡" not in out and "LeafSpec" not in out
    assert "step 20/40: val/loss=" in out and "step 40/40: val/loss=" in out and "val/bpc=" in out
    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["steps"] == 40 and [h["step"] for h in m["history"]] == [20, 40]
    assert m["tokens_seen"] == 40 * 12 * 32  # steps x batch x block
    assert "===== step 40 =====" in (trained_run / "samples.txt").read_text()


def test_checkpoint_is_self_contained(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["n_layer"] == 2 and hp["tokenizer"]["kind"] == "char"
    assert len(hp["tokenizer"]["chars"]) == hp["model"]["vocab_size"]
    assert ckpt["global_step"] == 40


def test_tensorboard_events_hold_scalars_and_text(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir(trained_run)), size_guidance={"tensors": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpc", "lr", "throughput/tokens_per_sec"} <= scalars
    assert {"throughput/mfu", "memory/peak_mb"} <= scalars
    assert "epoch" not in scalars and "hp_metric" not in scalars
    # the run is named by its overrides in TensorBoard's run selector, settings in HPARAMS
    assert tb_dir(trained_run).name.startswith("model=tiny,trainer.max_steps=40,")
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert [e.step for e in acc.Scalars("val/loss")] == [20, 40]
    lrs = [e.value for e in acc.Scalars("lr")]
    assert lrs[0] < max(lrs)  # warmup visible
    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    assert text_tags
    events = acc.Tensors(text_tags[0])
    assert [e.step for e in events] == [20, 40]
    assert len(events[-1].tensor_proto.string_val[0].decode()) > 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_lists_the_run(trained_run):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(trained_run.parent),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, tags = time.time() + 90, {}
        while time.time() < deadline:
            try:
                url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
                with urllib.request.urlopen(url, timeout=5) as r:
                    tags = json.load(r)
                if tags:
                    break
            except OSError:
                pass
            time.sleep(1)
        (run_tags,) = [v for k, v in tags.items() if trained_run.name in k]
        assert {"train/loss", "val/loss", "val/bpc", "lr"} <= set(run_tags)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_fast_dev_run_and_simultaneous_runs_get_their_own_directories(tmp_path):
    """`debug=fdr` runs the real entry point; two runs started together never share a dir."""
    args = [sys.executable, str(SRC / "train.py"), "debug=fdr", "model=tiny"]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "step 1/1: val/loss=" in out
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and dirs[0] != dirs[1]
    for d in dirs:
        assert (d / ".hydra" / "config.yaml").is_file()
        assert not list(d.glob("checkpoints/*.ckpt"))  # fast_dev_run saves nothing


def test_user_error_exits_2_with_a_message_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """In this process (tests.helpers.run_main: the same command line, Hydra and task runner):
    a process adds nothing to an error the task reports."""
    args = ["data=text", "data.path=does/not/exist.txt", "model=tiny"]
    code, _, err = run_main("train.py", *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2
    assert "error: data.path" in err and "does not exist" in err
    assert "Traceback" not in err
    assert run_dirs(tmp_path) == []


def test_a_run_ends_with_where_it_went_and_the_next_commands(trained_run):
    out = (trained_run / "stdout.txt").read_text()
    run = trained_run.relative_to(trained_run.parents[3]).as_posix()  # as shown: relative
    tail = out[out.rindex("run finished:") :]
    assert tail.startswith("run finished: 40 steps in ")
    assert f"run dir   {run}" in tail and f"best      {run}/checkpoints/best.ckpt" in tail
    for command in (f"generate.py ckpt={run}", f"eval.py ckpt={run}", f"resume={run}"):
        assert command in tail
    assert f"run directory: {trained_run}" in out  # said at the start too
    log = (trained_run / "train.log").read_text()
    assert "run finished: 40 steps" in log  # a cluster job's log ends the same way


@pytest.mark.parametrize("shell", ["env -i", "odd variables"])
def test_a_sweep_does_not_depend_on_the_callers_environment(tmp_path, shell):
    """Under `env -i` with a minimal PATH, and with odd variables (`$_` the shell's last
    command, HOME elsewhere, TMPDIR with a space): a two-job sweep over a non-ASCII value with an
    override that interpolates trains both jobs, each job's events in its own TensorBoard
    folder, and a `$NAME` in the sweep directory stays a folder name. (The corpus is a
    generated text file, and the CSV logger runs beside TensorBoard.)"""
    (tmp_path / "corpus.txt").write_text(make_text(20_000), encoding="utf-8")
    if shell == "env -i":
        env = {"PATH": "/usr/bin:/bin"}
    else:
        home, tmp = tmp_path / "home elsewhere", tmp_path / "tmp dir"
        home.mkdir(), tmp.mkdir()
        odd = {"_": "/usr/bin/make", "HOME": str(home), "TMPDIR": str(tmp), "X": "/elsewhere"}
        env = clean_env(odd)
    args = ["-m", "model=tiny", "data=text", "data.path=corpus.txt", "trainer.max_steps=2"]
    args += ["trainer.val_check_interval=2", "data.val_batches=1", "print_config=false"]
    args += ["callbacks.text_samples.max_new_tokens=4", "trainer.enable_progress_bar=false"]
    args += ["+tag=x,Ω", "+note=${paths.output_dir}", "hydra.sweep.dir=sweep$X$PATH"]
    args += ["logger=[tensorboard,csv]"]
    r = subprocess.run(
        [sys.executable, str(SRC / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    sweep = tmp_path / "sweep$X$PATH"
    folders = sorted(p.parent for p in tmp_path.rglob("events.out.tfevents.*"))
    # each job's events in SWEEP/<job>/tensorboard/<name>, whatever `$` the names came from
    parts = [f.relative_to(sweep).parts for f in folders]
    assert [p[:2] for p in parts] == [("0", "tensorboard"), ("1", "tensorboard")]
    names = [p[2] for p in parts]
    assert [len(p) for p in parts] == [3, 3] and not any("$" in n for n in names)
    assert "x" in names[0] and "Ω" in names[1] and "{paths.output_dir}" in names[0]
    tags = [OmegaConf.load(sweep / job / ".hydra" / "config.yaml").tag for job in ("0", "1")]
    assert tags == ["x", "Ω"]
    for job in ("0", "1"):
        assert "val/loss" in (sweep / job / "csv" / "metrics.csv").read_text().splitlines()[0]

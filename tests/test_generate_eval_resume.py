"""Checkpoints in use: generate.py, eval.py, and exact resume (ckpt_path= and resume=RUN_DIR)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from nanoforge.checkpoint import load_model, recorded_data, resolve_checkpoint
from nanoforge.errors import UserError
from nanoforge.inference import evaluate, evaluate_ids, generate
from nanoforge.model import GPT, GPTConfig
from tests.conftest import make_text, run_entry

pytestmark = pytest.mark.slow

COMMON = [
    "model=tiny",
    "data=text",
    "data.path=corpus.txt",
    "data.val_batches=2",
    "trainer.val_check_interval=10",
    "optim.decay_steps=40",
    "optim.warmup_steps=5",
    "model.dropout=0.1",
    "logger=tensorboard",
    "callbacks.text_samples.max_new_tokens=20",
]


def runs(cwd: Path) -> list[Path]:
    return sorted((cwd / "logs" / "train" / "runs").glob("*"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ckpt")
    (cwd / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    return cwd


@pytest.fixture(scope="module")
def straight_run(workdir) -> Path:
    r = run_entry(
        "train.py", *COMMON, "trainer.max_steps=40", "hydra.run.dir=straight", cwd=workdir
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir / "straight"


def gen_cfg(run, **kw):
    base = dict(
        ckpt=str(run),
        prompt="ROMEO:",
        max_new_tokens=30,
        num_samples=1,
        temperature=0.8,
        top_k=None,
        top_p=None,
        seed=1,
        use_cache=True,
        device="cpu",
    )
    return OmegaConf.create({**base, **kw})


# --------------------------------------------------------------------------- resume
def test_resume_in_place_equals_straight_run(workdir, straight_run):
    r = run_entry("train.py", *COMMON, "trainer.max_steps=20", "hydra.run.dir=halves", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    half = workdir / "halves"
    assert json.loads((half / "metrics.json").read_text())["steps"] == 20
    r = run_entry("train.py", f"resume={half}", "trainer.max_steps=40", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not runs(workdir)  # no new timestamped directory: it continued in place

    a = json.loads((straight_run / "metrics.json").read_text())
    b = json.loads((half / "metrics.json").read_text())
    assert b["steps"] == 40 and b["tokens_seen"] == a["tokens_seen"]
    assert [h["step"] for h in b["history"]] == [10, 20, 30, 40]  # history survived
    assert b["val/loss"] == pytest.approx(a["val/loss"], abs=1e-6)
    wa = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    wb = torch.load(half / "checkpoints" / "last.ckpt", weights_only=True)
    assert wa["global_step"] == wb["global_step"] == 40
    for k, v in wa["state_dict"].items():
        assert torch.allclose(v, wb["state_dict"][k], atol=1e-6), k
    # same TensorBoard run: both processes' events in one folder, val/loss continues
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((half / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(half / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20, 30, 40]
    # the composed config (recorded overrides + new ones) was kept
    cfg = OmegaConf.load(half / ".hydra" / "config.yaml")
    assert cfg.model.dropout == 0.1 and cfg.trainer.max_steps == 40


def test_resume_with_ckpt_path(workdir, straight_run):
    last = straight_run / "checkpoints" / "last.ckpt"
    r = run_entry(
        "train.py",
        *COMMON,
        "trainer.max_steps=50",
        f"ckpt_path={last}",
        "optim.decay_steps=50",
        "hydra.run.dir=more",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 50: val/loss=" in r.stdout and "step 10: val/loss=" not in r.stdout
    assert (
        torch.load(workdir / "more/checkpoints/last.ckpt", weights_only=True)["global_step"] == 50
    )


def test_resume_of_a_non_run_is_a_clear_error(workdir):
    r = run_entry("train.py", f"resume={workdir}", cwd=workdir, timeout=60)
    assert r.returncode == 2 and "not a run directory" in r.stderr


# --------------------------------------------------------------------------- generate
def test_checkpoint_alone_rebuilds_the_model(straight_run):
    assert resolve_checkpoint(straight_run).name == "best.ckpt"
    model, tok, ckpt = load_model(straight_run)
    assert not model.training and tok.vocab_size == model.config.vocab_size
    assert recorded_data(ckpt)["corpus"] == "text"  # eval.py rebuilds the data from it


def test_generate_streams_and_is_reproducible(straight_run):
    out = io.StringIO()
    (text,) = generate(gen_cfg(straight_run), out=out)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30
    assert out.getvalue() == text + "\n"
    assert generate(gen_cfg(straight_run), out=io.StringIO()) == [text]  # same seed, same text
    assert generate(gen_cfg(straight_run, seed=2), out=io.StringIO()) != [text]


def test_generate_greedy_with_and_without_cache_agree(straight_run):
    kw = dict(temperature=0, max_new_tokens=60)  # past the 32-token context of model=tiny
    cached = generate(gen_cfg(straight_run, **kw), out=io.StringIO())
    greedy_k1 = generate(
        gen_cfg(straight_run, temperature=1.0, top_k=1, max_new_tokens=60), out=io.StringIO()
    )
    assert cached == greedy_k1  # top_k=1 is greedy
    short = dict(temperature=0, max_new_tokens=20)  # within the context: exactly equal
    assert generate(gen_cfg(straight_run, **short), out=io.StringIO()) == generate(
        gen_cfg(straight_run, use_cache=False, **short), out=io.StringIO()
    )


def test_batched_samples_have_their_own_streams(straight_run):
    out = io.StringIO()
    texts = generate(gen_cfg(straight_run, num_samples=3, top_k=10, top_p=0.95), out=out)
    assert len(texts) == 3 and len(set(texts)) == 3
    assert out.getvalue().count("----- sample ") == 3


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"prompt": "ROMEO€"}, "never saw: '€'"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"ckpt": "nowhere.ckpt"}, "does not exist"),
    ],
)
def test_generate_bad_arguments(straight_run, kw, match):
    with pytest.raises(UserError, match=match):
        generate(gen_cfg(straight_run, **kw), out=io.StringIO())


def test_generate_entry_point(workdir, straight_run):
    r = run_entry(
        "generate.py",
        f"ckpt={straight_run}",
        "prompt=JULIET:",
        "max_new_tokens=25",
        cwd=workdir,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("JULIET:") and len(r.stdout.rstrip("\n")) >= len("JULIET:") + 20
    r = run_entry("generate.py", f"ckpt={straight_run}", "top_k=0", cwd=workdir, timeout=60)
    assert r.returncode == 2 and "top_k" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- eval
def test_evaluate_ids_scores_every_token_once():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=8)).eval()
    ids = torch.randint(7, (23,))
    res = evaluate_ids(model, ids, batch_size=2)
    assert res["tokens"] == 22
    # brute force: window by window, in 5-token chunks, the last one shorter
    total = 0.0
    for s in range(0, 22, 5):
        x, y = ids[s : min(s + 5, 22)], ids[s + 1 : min(s + 6, 23)]
        total += F.cross_entropy(model(x[None])[0][0], y, reduction="sum").item()
    assert res["loss"] == pytest.approx(total / 22, rel=1e-6)
    assert res["bpc"] == pytest.approx(res["loss"] / math.log(2))
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert evaluate_ids(model, ids, batch_size=7) == pytest.approx(res)  # batching is invisible


def test_eval_is_deterministic_and_writes_eval_json(straight_run, workdir):
    cfg = OmegaConf.create(
        {"ckpt": str(straight_run), "batch_size": 16, "output": None, "device": "cpu", "data": None}
    )
    a = evaluate(cfg, out=io.StringIO())
    b = evaluate(cfg, out=io.StringIO())
    assert a == b
    n_val = len(make_text(30_000)) - int(len(make_text(30_000)) * 0.9)
    assert a["tokens"] == n_val - 1  # the whole validation split
    saved = json.loads((straight_run / "eval.json").read_text())
    assert saved["loss"] == a["loss"] and saved["step"] == 40


def test_eval_other_text_and_unencodable_text(straight_run, workdir):
    other = workdir / "other.txt"
    other.write_text(make_text(5000, seed=9), encoding="utf-8")
    cfg = OmegaConf.create(
        {
            "ckpt": str(straight_run),
            "batch_size": 16,
            "device": "cpu",
            "output": str(workdir / "other_eval.json"),
            "data": {"corpus": "text", "path": str(other), "val_fraction": 0.5},
        }
    )
    res = evaluate(cfg, out=io.StringIO())
    n = len(other.read_text())
    assert res["tokens"] == n - int(n * 0.5) - 1 and (workdir / "other_eval.json").is_file()
    other.write_text("Zebra quagga ~~~ " * 50, encoding="utf-8")
    with pytest.raises(UserError, match="never saw"):
        evaluate(cfg, out=io.StringIO())


def test_eval_entry_point(workdir, straight_run):
    r = run_entry(
        "eval.py",
        f"ckpt={straight_run}/checkpoints/last.ckpt",
        f"output={workdir}/e.json",
        cwd=workdir,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "val/loss=" in r.stdout and "perplexity=" in r.stdout
    assert json.loads((workdir / "e.json").read_text())["tokens"] > 0

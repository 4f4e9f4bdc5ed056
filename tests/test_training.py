"""nanoforge.training: build data, module and trainer from the composed config.

Every impossible setting, and every bad data path, ends in a UserError that names the key
to change, before anything runs (also when it is raised inside Hydra's instantiate); the
seed is honoured, seed=0 included.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from nanoforge.errors import UserError
from nanoforge.training import build, train


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.n_embd=30", "model.n_head=4"], "divisible by model.n_head"),
        (["model.block_size=0"], "block_size must be >= 1"),
        (["optim.lr=0"], "optim.lr must be > 0"),
        (["optim.lr=-1e-3"], "optim.lr must be > 0"),
        (["trainer.max_steps=0"], "trainer.max_steps must be a positive integer"),
        (["trainer.max_steps=abc"], "trainer.max_steps must be a positive integer, got 'abc'"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval must be > 0"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
        (["model.dropout=-0.1"], r"model.dropout must be in \[0, 1\)"),
        (["+model.n_layers=4"], "unknown model option.*n_layers"),
        (["trainer.precision=17"], "trainer.precision=17 is not a precision: use one of 16-mixed"),
        pytest.param(
            ["trainer=gpu"],
            "trainer.accelerator=gpu but torch .* use trainer=cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here"),
        ),
    ],
)
def test_bad_settings(cfg_factory, text_file, overrides, match):
    with pytest.raises(UserError, match=match):
        build(cfg_factory("data=text", f"data.path={text_file}", *overrides))


def _latin1(p: Path) -> Path:
    f = p / "latin1.txt"
    f.write_bytes(b"To be, or not to be" * 100 + b"\xe9t\xe9")
    return f


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "d").mkdir() or p / "d", "no .txt/.md/.jsonl"),
        (lambda p: (p / "e.txt").write_text("") is not None and p / "e.txt", "empty"),
        (
            lambda p: (
                (p / "b.txt").write_bytes(random.Random(0).randbytes(64) + b"\x00") and p / "b.txt"
            ),
            "not UTF-8|binary",
        ),
        (_latin1, "latin1.txt is not UTF-8 text: byte offset 1900"),
        (lambda p: (p / "s.txt").write_text("tiny text") and p / "s.txt", "shorter than"),
    ],
)
def test_bad_data_paths(cfg_factory, tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(UserError, match=match):
        build(cfg_factory("data=text", f"data.path={path}"))


def test_seed_is_honoured_including_zero(cfg_factory, text_file):
    def weights(seed):
        cfg = cfg_factory(f"seed={seed}", "data=text", f"data.path={text_file}")
        _, module, _ = build(cfg)
        return torch.cat([p.flatten() for p in module.parameters()])

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def quick(cfg_factory, text_file, *overrides: str):
    return cfg_factory(
        "data=text",
        f"data.path={text_file}",
        "data.val_batches=1",
        "callbacks.text_samples.max_new_tokens=0",
        *overrides,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.precision=bf16-mixed"],  # (16-mixed is bf16-mixed on CPUs: Lightning's rule)
        # the GPU config, on the CPU: the same code path (bf16-mixed, clipping, AdamW)
        ["trainer=gpu", "trainer.accelerator=cpu"],
    ],
)
def test_every_documented_precision_trains_with_gradient_clipping(
    cfg_factory, text_file, one_thread, overrides
):
    cfg = quick(cfg_factory, text_file, "trainer.max_steps=3", *overrides)
    assert cfg.trainer.gradient_clip_val > 0 and cfg.trainer.precision != 32
    metrics = train(cfg)
    assert metrics["steps"] == 3 and math.isfinite(metrics["val/loss"])


def test_every_run_validates_at_its_last_step(cfg_factory, text_file, one_thread):
    cfg = quick(cfg_factory, text_file, "trainer.max_steps=7", "trainer.val_check_interval=5")
    metrics = train(cfg)
    assert [h["step"] for h in metrics["history"]] == [5, 7]  # once per interval, once at the end
    assert metrics["val/loss"] == metrics["history"][-1]["val/loss"]


def test_init_from_starts_a_new_run_from_the_weights_and_keeps_the_tokenizer(
    cfg_factory, tiny_run, one_thread
):
    """Fine-tuning: the checkpoint's weights and tokenizer, a fresh optimizer at step 0."""
    from nanoforge.checkpoint import load_model

    corpus = tiny_run.parent / "corpus.txt"
    cfg = cfg_factory("data=text", f"data.path={corpus}", f"init_from={tiny_run}")
    datamodule, module, _ = build(cfg)
    trained, tok, _ = load_model(tiny_run)
    assert datamodule.tokenizer == tok
    for name, value in trained.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], value), name
    with pytest.raises(UserError, match="n_embd 64 in the checkpoint, 32 in the config"):
        build(
            cfg_factory(
                "data=text", f"data.path={corpus}", f"init_from={tiny_run}", "model.n_embd=32"
            )
        )
    with pytest.raises(UserError, match="give one of them"):
        build(cfg_factory(f"init_from={tiny_run}", f"ckpt_path={tiny_run}/checkpoints/last.ckpt"))


def test_a_bpe_run_saves_its_tokenizer_as_plain_data_and_learns_from_train_only(
    cfg_factory, tmp_path, one_thread
):
    """tokenizer=bpe: merges from the training split only; the checkpoint loads with
    weights_only=True and rebuilds the same BPE tokenizer."""
    from nanoforge.checkpoint import load_model
    from nanoforge.tokenizer import BPETokenizer
    from tests.helpers import make_text

    # the last 10% (validation) is one word never seen in training, repeated
    train_text = make_text(18_000, seed=5)
    corpus = tmp_path / "bpe.txt"
    corpus.write_text(train_text + "zyzzyva " * 250, encoding="utf-8")
    cfg = cfg_factory(
        "data=text",
        f"data.path={corpus}",
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "data.val_batches=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.text_samples.max_new_tokens=5",
    )
    datamodule, module, trainer = build(cfg)
    tok = datamodule.tokenizer
    assert isinstance(tok, BPETokenizer) and module.config.vocab_size == tok.vocab_size
    assert len(tok.encode(" zyzzyva")) >= 4  # no merge learned from validation text
    trainer.fit(module, datamodule=datamodule)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["tokenizer"]["kind"] == "bpe"
    _, loaded, _ = load_model(tmp_path / "run")
    assert loaded == tok


def test_exact_resume_with_a_bpe_tokenizer_on_jsonl_documents(tmp_path, one_thread):
    """6 steps straight == 3 steps, then resumed from the checkpoint to 6 (tokenizer=bpe on
    JSON Lines documents, each ending with <|endoftext|>; dropout on): same weights, and the
    resumed run reuses the token file."""
    import json

    import numpy as np

    from tests.helpers import compose_run, make_text

    corpus = tmp_path / "docs.jsonl"
    docs = [make_text(1000, seed=i) for i in range(20)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")

    def run(name: str, steps: int, *extra: str):
        cfg = compose_run(
            tmp_path / name,
            "data=text",
            f"data.path={corpus}",
            f"paths.data_dir={tmp_path / 'data'}",
            "tokenizer=bpe",
            "tokenizer.vocab_size=300",
            "model.dropout=0.1",
            "data.val_batches=1",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=3",
            "callbacks.text_samples.max_new_tokens=0",
            *extra,
        )
        datamodule, module, trainer = build(cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        return tmp_path / name / "run"

    straight = run("straight", 6)
    half = run("half", 3)
    bins = sorted((tmp_path / "data" / "cache").glob("tokens-bpe-*.bin"))
    mtime = bins[0].stat().st_mtime_ns
    resumed = run("resumed", 6, f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}")
    assert len(bins) == 1 and bins[0].stat().st_mtime_ns == mtime  # prepared once
    assert (np.fromfile(bins[0], np.uint16) == 299).sum() == len(docs)  # one EOT a document
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["hyper_parameters"]["tokenizer"] == b["hyper_parameters"]["tokenizer"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_the_end_of_run_eval_hint_names_a_corpus_outside_the_data_folder(tmp_path):
    from types import SimpleNamespace

    from nanoforge.training import _eval_data

    data_dir = tmp_path / "data"
    (data_dir).mkdir()
    inside, outside = data_dir / "a.txt", tmp_path / "my corpus.txt"

    def dm(path):
        return SimpleNamespace(hparams={"path": str(path) if path else None}, corpus="text")

    assert _eval_data(dm(None), str(data_dir)) == ""  # a built-in corpus
    assert _eval_data(dm(inside), str(data_dir)) == ""  # followed from the checkpoint
    assert _eval_data(dm(outside), str(data_dir)) == f"data=text data.path='{outside}'"

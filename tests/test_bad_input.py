"""Every mistake a user can make ends in a UserError (exit 2) that names the problem and the fix."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from nanoforge.checkpoint import check_resumable, load_model
from nanoforge.errors import UserError
from nanoforge.training import build
from tests.conftest import run_entry


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.n_embd=30", "model.n_head=4"], "divisible by model.n_head"),
        (["model.block_size=0"], "block_size must be >= 1"),
        (["optim.lr=0"], "optim.lr must be > 0"),
        (["optim.lr=-1e-3"], "optim.lr must be > 0"),
        (["trainer.max_steps=0"], "trainer.max_steps must be a positive integer"),
        (["trainer.max_steps=abc"], "trainer.max_steps must be a positive integer, got 'abc'"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
        (["model.dropout=-0.1"], r"model.dropout must be in \[0, 1\)"),
        (["+model.n_layers=4"], "unknown model option.*n_layers"),
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
        (lambda p: (p / "d").mkdir() or p / "d", "no .txt files"),
        (lambda p: (p / "e.txt").write_text("") is not None and p / "e.txt", "empty"),
        (
            lambda p: (p / "b.txt").write_bytes(os.urandom(64) + b"\x00") and p / "b.txt",
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


# --------------------------------------------------------------------------- checkpoints
class Evil:
    """Unpickling this would create a file (what an attacker's checkpoint would do)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_malicious_checkpoint_does_not_run(tmp_path):
    target = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Evil(target)}, bad)
    # sanity: a plain unpickle *would* run it
    with pytest.raises(UserError, match="refused for safety"):
        load_model(bad)
    with pytest.raises(UserError, match="refused for safety"):
        check_resumable(bad)
    assert not target.exists()
    torch.load(bad, weights_only=False)  # the file really is armed
    assert target.exists()


@pytest.fixture
def real_ckpt(tmp_path, cfg_factory, text_file) -> Path:
    """A real nanoforge checkpoint from a 2-step in-process run."""
    datamodule, module, trainer = build(
        cfg_factory(
            "data=text",
            f"data.path={text_file}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.val_batches=1",
            "callbacks.text_samples.max_new_tokens=5",
        )
    )
    trainer.fit(module, datamodule=datamodule)
    return Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"


def test_checkpoint_errors(tmp_path, real_ckpt):
    model, tok, _ = load_model(real_ckpt)  # the good one loads
    assert tok.vocab_size == model.config.vocab_size
    check_resumable(real_ckpt)

    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.ckpt")
    notckpt = tmp_path / "notes.ckpt"
    notckpt.write_text("these are my notes, not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_model(notckpt)
    truncated = tmp_path / "truncated.ckpt"
    data = real_ckpt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_model(truncated)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        check_resumable(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 3}, foreign)
    with pytest.raises(UserError, match="not saved by nanoforge"):
        load_model(foreign)
    with pytest.raises(UserError, match="not a nanoforge training checkpoint"):
        check_resumable(foreign)
    assert zipfile.is_zipfile(real_ckpt)  # torch's format: a zip archive


@pytest.mark.slow
def test_hydra_config_errors_are_short_and_non_zero(tmp_path):
    cases = [
        (["model=huge"], "Could not find 'model/huge'"),
        (["model.n_layers=4"], "n_layers"),
    ]
    for args, expected in cases:
        r = run_entry("train.py", *args, cwd=tmp_path, timeout=60)
        assert r.returncode != 0 and expected in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = run_entry("train.py", "model=tiny", "trainer.max_steps=abc", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "trainer.max_steps must be a positive integer" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "logs" / "train" / "runs").exists() or not any(
        (tmp_path / "logs" / "train" / "runs").iterdir()
    )

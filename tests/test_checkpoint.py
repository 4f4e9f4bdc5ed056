"""nanoforge.checkpoint: a checkpoint alone rebuilds the model, and reading one is safe.

resolve_checkpoint finds a run's checkpoint; load_model rebuilds the GPT and its tokenizer;
recorded_data says which text a run trained on; check_resumable and load_model refuse, with
a clear UserError, anything that is not a nanoforge checkpoint (and never unpickle code);
AtomicCheckpointIO never leaves a half-written checkpoint, even under kill -9.
"""

from __future__ import annotations

import errno
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from nanoforge.checkpoint import (
    check_resumable,
    config_differences,
    load_model,
    recorded_data,
    resolve_checkpoint,
)
from nanoforge.checkpoint_writer import AtomicCheckpointIO
from nanoforge.errors import UserError
from tests.helpers import SRC


# --------------------------------------------------------------------------- finding one
def test_resolve_checkpoint_prefers_best_then_last(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no checkpoints/best.ckpt"):
        resolve_checkpoint(run)
    (run / "checkpoints" / "last.ckpt").touch()
    assert resolve_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "best.ckpt").touch()
    assert resolve_checkpoint(run) == run / "checkpoints" / "best.ckpt"
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "best.ckpt"
    assert resolve_checkpoint(run / "checkpoints" / "last.ckpt").name == "last.ckpt"  # a file
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere.ckpt")
    with pytest.raises(UserError, match="no checkpoint given"):
        resolve_checkpoint(None)


# --------------------------------------------------------------------------- loading one
def test_checkpoint_alone_rebuilds_the_model(tiny_run):
    assert resolve_checkpoint(tiny_run).name == "best.ckpt"
    model, tok, ckpt = load_model(tiny_run)
    assert not model.training and tok.vocab_size == model.config.vocab_size
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_recorded_data_reads_the_datamodule_and_older_checkpoints(tiny_run):
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    recorded = recorded_data(ckpt)  # what Lightning saved: datamodule_hyper_parameters
    assert recorded == dict(ckpt["datamodule_hyper_parameters"])
    assert recorded["corpus"] == "text"
    assert recorded["path"] == str((tiny_run.parent / "corpus.txt").resolve())
    legacy = {  # checkpoints written before the DataModule recorded itself
        "hyper_parameters": {"data": {"corpus": "text", "path": "/old/corpus.txt"}},
    }
    assert recorded_data(legacy) == {"corpus": "text", "path": "/old/corpus.txt"}
    assert recorded_data({**legacy, "datamodule_hyper_parameters": recorded}) == recorded
    assert recorded_data({"hyper_parameters": {"model": {}}}) is None
    assert recorded_data({}) is None


def test_checkpoint_errors(tmp_path, tiny_run):
    good = tiny_run / "checkpoints" / "last.ckpt"
    model, tok, _ = load_model(good)  # the good one loads
    assert tok.vocab_size == model.config.vocab_size
    check_resumable(good)
    assert zipfile.is_zipfile(good)  # torch's format: a zip archive

    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.ckpt")
    notckpt = tmp_path / "notes.ckpt"
    notckpt.write_text("these are my notes, not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_model(notckpt)
    truncated = tmp_path / "truncated.ckpt"
    data = good.read_bytes()
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
    with pytest.raises(UserError, match="refused for safety"):
        load_model(bad)
    with pytest.raises(UserError, match="refused for safety"):
        check_resumable(bad)
    assert not target.exists()
    torch.load(bad, weights_only=False)  # the file really is armed: a plain unpickle runs it
    assert target.exists()


# --------------------------------------------------------------------------- writing one
WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {src!r})
    from nanoforge.checkpoint_writer import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    i = 0
    print("ready", flush=True)
    while True:  # ~16 MB per checkpoint, written back to back: kills land mid-write
        io.save_checkpoint({{"i": i, "w": torch.full((4_000_000,), float(i))}}, {target!r})
        i += 1
    """
)


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_never_leaves_a_broken_file(tmp_path):
    target = tmp_path / "last.ckpt"
    rng = random.Random(0)
    seen = set()
    # two writers of the same file at once, killed one after the other mid-write
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER.format(src=str(SRC), target=str(target))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in writers:
        assert proc.stdout.readline().strip() == "ready"
    for proc in writers:
        time.sleep(rng.uniform(0.2, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():  # whatever is there is complete and loadable
            ckpt = torch.load(target, weights_only=True)
            assert torch.all(ckpt["w"] == float(ckpt["i"]))
            seen.add(ckpt["i"])
    assert seen, "no checkpoint was ever completed"
    # the next save cleans up the temporary files the killed writers left behind
    AtomicCheckpointIO().save_checkpoint({"i": -1}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_full_disk_is_one_line_naming_the_intact_checkpoint(tmp_path, monkeypatch):
    writer = AtomicCheckpointIO()
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    writer.save_checkpoint({"global_step": 10, "w": torch.ones(3)}, target)

    def no_space(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", no_space)
        with pytest.raises(UserError) as e:
            writer.save_checkpoint({"global_step": 20, "w": torch.zeros(3)}, target)
    message = str(e.value)
    assert "no space left on device while saving last.ckpt at step 20" in message
    assert (
        "from step 10 is intact" in message
        and f"resume={shlex.quote(str(tmp_path / 'run'))}" in message
    )
    assert torch.load(target, weights_only=True)["global_step"] == 10
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_the_file_size_limit_is_one_line_naming_the_intact_checkpoint(tmp_path):
    """``ulimit -f``: the kernel refuses the write past the limit (EFBIG; Python ignores the
    SIGXFSZ signal that would kill the process). Set here for this process, briefly."""
    resource = pytest.importorskip("resource")  # POSIX

    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 10, "w": torch.ones(3)}, target)
    writer = AtomicCheckpointIO()  # a resumed run's writer: the step is read from the file
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(UserError) as e:
            writer.save_checkpoint({"global_step": 20, "w": torch.zeros(100_000)}, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(e.value) == (
        "the file size limit (ulimit -f) of 200,000 bytes was reached while saving last.ckpt "
        f"at step 20; {target} from step 10 is intact. Raise it (ulimit -f), then resume: "
        f"python src/train.py resume={shlex.quote(str(tmp_path / 'run'))}"
    )
    assert torch.load(target, weights_only=True)["global_step"] == 10
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_config_differences_name_each_key_and_ignore_dropout():
    old = {"vocab_size": 65, "n_embd": 32, "n_head": 4, "dropout": 0.0}
    new = {"vocab_size": 65, "n_embd": 64, "n_head": 4, "dropout": 0.2, "attention": "reference"}
    assert config_differences(old, new) == ["n_embd 32 in the checkpoint, 64 in the config"]
    assert config_differences(old, old) == []


def test_resume_is_refused_for_another_model_or_other_text(tiny_run):
    last = tiny_run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    model, data = ckpt["hyper_parameters"]["model"], ckpt["TextDataModule"]
    check_resumable(last, model, data, ckpt["hyper_parameters"]["tokenizer"])  # the same run
    with pytest.raises(UserError, match="n_layer 2 in the checkpoint, 3 in the config"):
        check_resumable(last, {**model, "n_layer": 3})
    other = {**data, "text_sha256": "0" * 64, "source": "other.txt"}
    with pytest.raises(UserError, match="other text \\(other.txt\\).*init_from="):
        check_resumable(last, model, other)
    with pytest.raises(UserError, match="other text"):
        check_resumable(last, model, {**data, "split": 0.2})


def test_a_sharded_fsdp_checkpoint_says_how_to_make_it_one_file(tmp_path):
    shards = tmp_path / "last.ckpt"
    shards.mkdir()
    (shards / ".metadata").write_bytes(b"")  # what torch.distributed.checkpoint writes
    (shards / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(UserError, match="sharded FSDP checkpoint.*consolidate_checkpoint"):
        resolve_checkpoint(shards)


def _crafted(tmp_path, model: dict, state: dict, tokenizer: dict | None = None) -> Path:
    """A small checkpoint file with the given model config, weights and tokenizer."""
    path = tmp_path / "crafted.ckpt"
    tokenizer = tokenizer or {"kind": "char", "chars": "abcd"}
    hp = {"model": model, "tokenizer": tokenizer}
    torch.save({"hyper_parameters": hp, "state_dict": state}, path)
    return path


def test_sizes_a_checkpoint_claims_are_checked_before_anything_is_allocated(tmp_path, monkeypatch):
    import nanoforge.checkpoint as checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the model was built from an unchecked config")

    from nanoforge.model import GPT, GPTConfig

    small = {"vocab_size": 4, "n_layer": 1, "n_head": 1, "n_embd": 8}
    weights = GPT(GPTConfig(**small, block_size=16)).state_dict()
    state = {f"model.{k}": v for k, v in weights.items()}
    real = checkpoint.GPT
    # only a model on the meta device (no memory) may be built before the sizes are checked
    monkeypatch.setattr(
        checkpoint,
        "GPT",
        lambda config: real(config) if torch.empty(0).is_meta else never(),
    )
    huge = _crafted(tmp_path, {**small, "block_size": 4_000_000_000}, state)
    assert huge.stat().st_size < 10_000
    with pytest.raises(UserError, match="block_size=4,000,000,000 is above the limit"):
        load_model(huge)
    # within the limits, but not what the weights hold: 1M positions claimed, 16 stored
    claims = _crafted(tmp_path, {**small, "block_size": 1 << 20}, state)
    with pytest.raises(UserError, match=r"wpe.weight has shape \(16, 8\).*disagree"):
        load_model(claims)
    deeper = _crafted(tmp_path, {**small, "block_size": 16, "n_layer": 2}, state)
    with pytest.raises(UserError, match="lack blocks.1.ln_1.weight"):
        load_model(deeper)


def test_a_tokenizer_that_disagrees_with_the_model_vocabulary_is_refused(tmp_path, tiny_run):
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    tok = ckpt["hyper_parameters"]["tokenizer"]
    ckpt["hyper_parameters"]["tokenizer"] = {**tok, "chars": tok["chars"][:-3]}
    torch.save(ckpt, tmp_path / "short.ckpt")
    with pytest.raises(UserError, match="its tokenizer has .* tokens but its model"):
        load_model(tmp_path / "short.ckpt")

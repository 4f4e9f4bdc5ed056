"""nanoforge.callbacks: what a run writes beside its checkpoints, from a real (in-process)
training run with the configured callbacks.

RunSummary writes metrics.json (the validation history, tokens counted by TokenThroughput);
TextSamples appends a sample to samples.txt at every validation. (GracefulStop's SIGTERM
handling and the TensorBoard events are checked on the real entry point, in test_e2e_*.)
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from nanoforge.callbacks import TokenThroughput, device_peak_flops


def test_metrics_json(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["status"] == "finished" and m["steps"] == 10
    assert m["best/checkpoint"].endswith("checkpoints/best.ckpt")
    assert m["tokens_seen"] == 10 * 12 * 32  # steps x batch x block
    assert m["best/val/loss"] <= m["val/loss"]
    assert m["val/bpc"] == pytest.approx(m["val/loss"] / math.log(2), rel=1e-6)
    # ASCII text: one byte per character, so bits per byte = bits per character
    assert m["val/bpb"] == pytest.approx(m["val/bpc"], rel=1e-5)
    assert [h["step"] for h in m["history"]] == [5, 10]
    assert m["history"][-1]["val/loss"] == m["val/loss"]
    assert m["best/val/loss"] == min(h["val/loss"] for h in m["history"])
    assert m["num_params"] > 0 and m["wall_seconds"] > 0 and m["train_tokens_per_sec"] > 0
    # how well the hardware was used: on a CPU the peak is a matmul measured at start
    assert 0 < m["mfu"] < 1 and m["peak_flops"] > 1e8 and m["peak_memory_mb"] > 50


def test_samples_txt(tiny_run):
    text = (tiny_run / "samples.txt").read_text()
    assert text.count("===== step ") == 2
    assert "===== step 5 =====" in text and "===== step 10 =====" in text


def test_the_default_sample_prompt_works_on_a_corpus_without_line_breaks(tmp_path):
    from nanoforge.callbacks import TextSamples
    from nanoforge.errors import UserError
    from nanoforge.tokenizer import CharTokenizer

    module = SimpleNamespace(tokenizer=CharTokenizer.from_text("to be or not to be"))
    samples = TextSamples(str(tmp_path))  # prompt "\n", which this corpus lacks
    samples.on_fit_start(None, module)
    assert samples.prompt == " "  # a character the corpus has
    with pytest.raises(UserError, match="has characters the corpus lacks"):
        TextSamples(str(tmp_path), prompt="ROMEO").on_fit_start(None, module)  # chosen: said


def test_mfu_counts_every_rank_against_every_device(monkeypatch):
    """MFU = tokens/s (all ranks) x FLOPs per token / (peak per device x world size)."""
    import torch

    logged = {}
    module = SimpleNamespace(
        device=torch.device("cpu"),
        model=SimpleNamespace(flops_per_token=lambda: 1_000),
        log=lambda key, value: logged.__setitem__(key, value),
    )
    trainer = SimpleNamespace(world_size=2, precision="32-true", log_every_n_steps=2)
    thr = TokenThroughput(peak_flops=1e6)  # per device (trainer.peak_flops=1e6)
    thr.on_fit_start(trainer, module)
    clock = iter([0.0, 1.0])  # the window opens at 0 s and closes at 1 s
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    batch = (torch.zeros(4, 8, dtype=torch.long),)
    thr.on_train_batch_start(trainer, module, batch, 0)
    for step in (1, 2):
        trainer.global_step = step
        thr.on_train_batch_end(trainer, module, None, batch, 0)
    tokens_per_sec = 2 * (4 * 8) * 2  # 2 steps x batch tokens x 2 ranks, in 1 s
    assert logged["throughput/tokens_per_sec"] == tokens_per_sec
    assert logged["throughput/mfu"] == pytest.approx(tokens_per_sec * 1_000 / (1e6 * 2))
    assert logged["memory/peak_mb"] > 0
    assert device_peak_flops(torch.device("cpu")) > 1e8  # measured, cached per thread count


def test_a_moved_run_directory_keeps_its_best_checkpoint_record(tmp_path):
    """Resumed after `mv RUN elsewhere`, a run forgot its best score (Lightning keeps it only
    for an unchanged dirpath), so the first validation replaced best.ckpt whatever its loss."""
    import torch

    from nanoforge.callbacks import RunCheckpoint

    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    new.mkdir(parents=True)
    (new / "best.ckpt").write_bytes(b"")
    score = torch.tensor(1.5)
    state = {
        "dirpath": str(old),
        "monitor": "val/loss",
        "best_model_score": score,
        "best_model_path": str(old / "best.ckpt"),
        "kth_best_model_path": str(old / "best.ckpt"),
        "kth_value": score,
        "best_k_models": {str(old / "best.ckpt"): score},
        "last_model_path": str(old / "last.ckpt"),
    }
    moved = RunCheckpoint(dirpath=new, filename="best", monitor="val/loss")
    moved.load_state_dict(dict(state))
    assert moved.best_model_score == score and moved.best_model_path == str(new / "best.ckpt")
    assert moved.best_k_models == {str(new / "best.ckpt"): score}
    # a checkpoint from another run (no best.ckpt here): as Lightning loads it
    (new / "best.ckpt").unlink()
    other = RunCheckpoint(dirpath=new, filename="best", monitor="val/loss")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        other.load_state_dict(dict(state))
    assert other.best_model_score is None

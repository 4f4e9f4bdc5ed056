"""nanoforge.callbacks: what a run writes beside its checkpoints, from a real (in-process)
training run with the configured callbacks.

RunSummary writes metrics.json (the validation history, tokens counted by TokenThroughput);
TextSamples appends a sample to samples.txt at every validation. (GracefulStop's SIGTERM
handling and the TensorBoard events are checked on the real entry point, in test_e2e_*.)
"""

from __future__ import annotations

import json
import math

import pytest


def test_metrics_json(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["steps"] == 10
    assert m["tokens_seen"] == 10 * 12 * 32  # steps x batch x block
    assert m["best/val/loss"] <= m["val/loss"]
    assert m["val/bpc"] == pytest.approx(m["val/loss"] / math.log(2), rel=1e-6)
    assert [h["step"] for h in m["history"]] == [5, 10]
    assert m["history"][-1]["val/loss"] == m["val/loss"]
    assert m["best/val/loss"] == min(h["val/loss"] for h in m["history"])
    assert m["num_params"] > 0 and m["wall_seconds"] > 0 and m["train_tokens_per_sec"] > 0


def test_samples_txt(tiny_run):
    text = (tiny_run / "samples.txt").read_text()
    assert text.count("===== step ") == 2
    assert "===== step 5 =====" in text and "===== step 10 =====" in text

"""nanoforge.module: GPTModule, the training recipe Lightning runs.

The next-token loss learns; in a real Lightning fit the learning rate follows lr_at step by
step and the metrics are logged; a NaN/inf loss stops training (keeping the last good
checkpoint) unless skipping such batches was asked for.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from nanoforge.callbacks import RunSummary
from nanoforge.errors import NonFiniteLossError, UserError
from nanoforge.module import GPTModule
from nanoforge.optim import lr_at
from nanoforge.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
MODEL = {"vocab_size": TOK.vocab_size, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def module(**optim) -> GPTModule:
    torch.manual_seed(0)
    return GPTModule(
        model=MODEL,
        optim={"warmup_steps": 0, "weight_decay": 0.0, **optim},
        tokenizer=TOK.state_dict(),
    )


def trainer(tmp_path, steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_module_overfits_a_single_batch():
    m = module(lr=3e-3)
    torch.manual_seed(1)
    x = torch.randint(TOK.vocab_size, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = m(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(TOK.vocab_size), abs=0.15)
    assert loss.item() < 0.1


def test_trainer_steps_schedule_and_logs(tmp_path):
    """A real Lightning fit: the LR follows lr_at step by step and metrics are logged."""
    m = module(lr=1e-3, min_lr=1e-4, warmup_steps=3)
    x = torch.randint(TOK.vocab_size, (2, 16))
    data = [(x, torch.roll(x, -1, 1))] * 8
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    t = trainer(tmp_path, 8, [Spy()], enable_checkpointing=False)
    t.fit(m, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert seen == pytest.approx([lr_at(s, 1e-3, 1e-4, 3, 8) for s in range(8)])
    assert "train/loss" in t.callback_metrics


# --------------------------------------------------------------------------- NaN / inf loss
NAN_TOK = CharTokenizer.from_text("abcdefgh \n")


class PoisonedModule(GPTModule):
    """Returns a NaN loss on the given training calls (what an exploding run looks like)."""

    def __init__(self, poisoned: set[int], **kw):
        super().__init__(
            model={
                "vocab_size": NAN_TOK.vocab_size,
                "block_size": 8,
                "n_layer": 1,
                "n_head": 1,
                "n_embd": 8,
            },
            optim={"warmup_steps": 0},
            tokenizer=NAN_TOK.state_dict(),
            **kw,
        )
        self.poisoned, self.calls = poisoned, 0

    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        if loss is not None and self.training:
            if self.calls in self.poisoned:
                loss = loss * float("nan")
            self.calls += 1
        return logits, loss


def fit_poisoned(module, tmp_path, steps=12) -> L.Trainer:
    x = torch.randint(NAN_TOK.vocab_size, (2, 8))
    data = torch.utils.data.DataLoader([(x, x)] * 100, batch_size=None)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_last=True, every_n_train_steps=1
    )
    t = trainer(tmp_path, steps, [ckpt])
    t.fit(module, train_dataloaders=data)
    return t


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="became nan at step 5"):
        fit_poisoned(PoisonedModule(poisoned=set(range(5, 100))), tmp_path)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_nan_batches_can_be_skipped_and_counted(tmp_path):
    module = PoisonedModule(poisoned={5, 6, 7}, skip_nonfinite=True)
    t = fit_poisoned(module, tmp_path, steps=10)
    # a skipped batch still counts as a step (Lightning steps the optimizer with no gradients,
    # so nothing is updated); training ran to the end
    assert t.global_step == 10 and module.calls == 10
    assert module.skipped_batches == 3
    assert t.callback_metrics["train/skipped_batches"] == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nan_before_any_checkpoint_says_none_was_saved(tmp_path):
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been saved yet"):
        fit_poisoned(PoisonedModule(poisoned={0}), tmp_path)


def test_fused_adamw_with_mixed_precision_and_clipping_is_a_clear_error(tmp_path):
    module = PoisonedModule(poisoned=set())
    module.optim_config.fused = True
    t = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    x = torch.randint(NAN_TOK.vocab_size, (2, 8))
    with pytest.raises(UserError, match="optim.fused=null"):
        t.fit(module, train_dataloaders=torch.utils.data.DataLoader([(x, x)], batch_size=None))


def test_a_nan_stop_is_recorded_as_failed_in_metrics_json(tmp_path):
    x = torch.randint(NAN_TOK.vocab_size, (2, 8))
    data = torch.utils.data.DataLoader([(x, x)] * 100, batch_size=None)
    t = trainer(tmp_path, 12, [RunSummary(str(tmp_path))])
    with pytest.raises(NonFiniteLossError):
        t.fit(PoisonedModule(poisoned={3}), train_dataloaders=data)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "became nan at step 3" in metrics["error"]
    # noted on the device at step 3, read at the next check (logging interval or train end)
    assert metrics["steps"] == t.global_step and 3 < t.global_step <= 12


def test_the_nan_check_costs_no_sync_between_logging_intervals(monkeypatch, tmp_path):
    """torch.isfinite(loss) -> bool would sync the device every step; the loss is only read
    every trainer.log_every_n_steps steps (and before validations and checkpoints)."""
    reads = []
    module = PoisonedModule(poisoned=set())
    original = GPTModule.check_finite

    def counting(self):
        reads.append(self.global_step)
        return original(self)

    monkeypatch.setattr(GPTModule, "check_finite", counting)
    x = torch.randint(NAN_TOK.vocab_size, (2, 8))
    data = torch.utils.data.DataLoader([(x, x)] * 100, batch_size=None)
    t = trainer(tmp_path, 20, [])
    t.log_every_n_steps = 5
    t.fit(module, train_dataloaders=data)
    # every 5th step, then before the final checkpoint and at the end of training
    assert reads == [4, 9, 14, 19, 20, 20]


def test_val_bpb_is_loss_times_tokens_over_bytes_over_ln2(tmp_path):
    """On a known batch with multi-byte characters: val/bpb = val/loss * tokens / bytes / ln 2
    (and val/bpc = val/loss / ln 2 for a char tokenizer)."""
    tok = CharTokenizer.from_text("ab é東🙂")  # 1, 1, 1, 2, 3 and 4 UTF-8 bytes
    torch.manual_seed(0)
    m = GPTModule(
        model={**MODEL, "vocab_size": tok.vocab_size},
        optim={"warmup_steps": 0},
        tokenizer=tok.state_dict(),
    )
    torch.manual_seed(1)
    x = torch.randint(tok.vocab_size, (3, 16))
    y = torch.randint(tok.vocab_size, (3, 16))
    batches = [(x, y), (y, x)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    out = trainer(tmp_path, 1).validate(m, dataloaders=loader, verbose=False)[0]
    with torch.no_grad():
        losses = [m(a, b)[1].item() for a, b in batches]
    token_bytes = [len(c.encode()) for c in tok.chars]
    nbytes = sum(token_bytes[i] for _, b in batches for i in b.flatten().tolist())
    tokens = 2 * y.numel()
    loss = sum(losses) / 2
    assert out["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert out["val/bpc"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert out["val/bpb"] == pytest.approx(loss * tokens / nbytes / math.log(2), rel=1e-5)
    assert nbytes > tokens  # the multi-byte characters count: bpb < bpc
    assert out["val/bpb"] < out["val/bpc"]

import itertools
import math

import lightning as L
import pytest
import torch

from nanoforge.errors import UserError
from nanoforge.module import GPTModule
from nanoforge.optim import OptimConfig, lr_at, param_groups
from nanoforge.tokenizer import CharTokenizer

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
MODEL = {"vocab_size": TOK.vocab_size, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def module(**optim) -> GPTModule:
    torch.manual_seed(0)
    return GPTModule(
        model=MODEL,
        optim={"warmup_steps": 0, "weight_decay": 0.0, **optim},
        tokenizer=TOK.state_dict(),
    )


def test_weight_decay_groups_partition_the_parameters():
    m = module().model
    decay, no_decay = param_groups(m, 0.1)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # disjoint (and the tied weight appears once)
    assert set(ids) == {id(p) for p in m.parameters()}  # complete
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(p is m.wte.weight for p in decay["params"])


def test_lr_schedule_warmup_peak_floor():
    lr, min_lr, warm, total = 1e-3, 1e-4, 10, 110
    lrs = [lr_at(s, lr, min_lr, warm, total, "cosine") for s in range(130)]
    assert lrs[0] == pytest.approx(lr / 11)
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # rising in warmup
    assert lrs[warm] == pytest.approx(lr)  # peak right after warmup
    assert max(lrs) == pytest.approx(lr)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:111]))  # cosine decay
    assert lrs[60] == pytest.approx(min_lr + 0.5 * (lr - min_lr))  # halfway down
    assert lrs[110] == lrs[129] == min_lr  # floor


def test_optim_config_rejects_bad_lr():
    with pytest.raises(UserError, match="optim.lr"):
        OptimConfig(lr=0)


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

    trainer = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=False,
        callbacks=[Spy()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert seen == pytest.approx([lr_at(s, 1e-3, 1e-4, 3, 8) for s in range(8)])
    assert "train/loss" in trainer.callback_metrics

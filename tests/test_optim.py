"""nanoforge.optim: the optimizer and its learning-rate schedule.

OptimConfig checks ``cfg.optim``; param_groups puts weight decay on matrices only; lr_at is
the schedule (warmup, then cosine or warmup-stable-decay); configure_optimizer builds AdamW,
or Muon for the hidden matrices + AdamW for the rest (MuonAdamW), with the per-step scheduler.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nanoforge.errors import UserError
from nanoforge.model import GPT, GPTConfig
from nanoforge.optim import (
    MuonAdamW,
    MuonFP32,
    OptimConfig,
    configure_optimizer,
    cooldown_start,
    first_difference,
    lr_at,
    muon_params,
    orthogonalize,
    param_groups,
    wsd_cooldown_start,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 29
MODEL = {"vocab_size": VOCAB, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**MODEL))


# --------------------------------------------------------------------------- OptimConfig
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": 0}, "optim.lr"),
        ({"schedule": "step"}, "optim.schedule"),
        ({"optimizer": "sgd"}, "optim.optimizer"),
        ({"cooldown_frac": 1.5}, "cooldown_frac"),
    ],
)
def test_bad_optim_option_named(kw, match):
    with pytest.raises(UserError, match=match):
        OptimConfig(**kw)


# --------------------------------------------------------------------------- param groups
def test_weight_decay_groups_partition_the_parameters():
    m = gpt()
    decay, no_decay = param_groups(m, 0.1)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # disjoint (and the tied weight appears once)
    assert set(ids) == {id(p) for p in m.parameters()}  # complete
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(p is m.wte.weight for p in decay["params"])


# --------------------------------------------------------------------------- schedules
def test_cosine_schedule_warmup_peak_floor():
    lr, min_lr, warm, total = 1e-3, 1e-4, 10, 110
    lrs = [lr_at(s, lr, min_lr, warm, total, "cosine") for s in range(130)]
    assert lrs[0] == pytest.approx(lr / 11)
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # rising in warmup
    assert lrs[warm] == pytest.approx(lr)  # peak right after warmup
    assert max(lrs) == pytest.approx(lr)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:111]))  # cosine decay
    assert lrs[60] == pytest.approx(min_lr + 0.5 * (lr - min_lr))  # halfway down
    assert lrs[110] == lrs[129] == min_lr  # floor


def test_wsd_schedule_warmup_stable_cooldown():
    lr, min_lr, warm, total = 1e-3, 1e-4, 10, 110
    lrs = [lr_at(s, lr, min_lr, warm, total, "wsd", 0.2) for s in range(130)]
    assert lrs[0] == pytest.approx(lr / 11)
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # warmup
    assert lrs[10:88] == [lr] * 78  # stable until the last 20% (22 steps) of 110
    assert all(a > b for a, b in itertools.pairwise(lrs[88:111]))  # linear cool-down
    assert lrs[99] == pytest.approx(lr - (11 / 22) * (lr - min_lr))
    assert lrs[110] == lrs[129] == min_lr


def test_a_longer_wsd_plan_agrees_with_a_shorter_one_until_its_cool_down():
    """What makes an extension exact: the cool-down never starts earlier in a longer plan, and
    up to the shorter plan's cool-down start both give every step the same LR."""
    for frac in (0.0, 0.1, 0.2, 0.5, 0.75, 1.0):
        starts = [wsd_cooldown_start(10, d, frac) for d in range(1, 3000)]
        assert starts == sorted(starts), frac
    o = OptimConfig(warmup_steps=20)
    start = cooldown_start(o, 300)
    assert start == 240 and cooldown_start(OptimConfig(schedule="cosine"), 300) is None
    assert first_difference(o, 300, o, 600, start) is None  # steps 0..240 alike
    assert first_difference(o, 300, o, 600, 300) == start + 1  # 241: the short plan decays
    # a fixed decay length: a longer run changes nothing, a longer decay is a longer plan
    fixed = OptimConfig(warmup_steps=20, decay_steps=300)
    assert first_difference(fixed, 300, fixed, 600, 600) is None
    assert (
        first_difference(fixed, 300, OptimConfig(warmup_steps=20, decay_steps=600), 600, 240)
        is None
    )
    cosine = OptimConfig(warmup_steps=20, schedule="cosine")
    assert first_difference(cosine, 300, cosine, 600, 300) == 21  # decays from the warmup on


# --------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("decay_steps, length", [(None, 30), (20, 20)])
def test_adamw_over_the_decay_groups_and_a_per_step_schedule(decay_steps, length):
    """The schedule runs over decay_steps when it is set, else over trainer.max_steps."""
    m = gpt()
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, decay_steps=decay_steps)
    cfg = configure_optimizer(m, o, max_steps=30)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.AdamW and cfg["lr_scheduler"]["interval"] == "step"
    expected = param_groups(m, o.weight_decay)
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in expected]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in expected
    ]
    seen = []
    for _ in range(35):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, 1e-3, 1e-4, 3, length) for s in range(35)])


# --------------------------------------------------------------------------- Muon
def muon(**optim) -> tuple[GPT, MuonAdamW, torch.optim.lr_scheduler.LRScheduler]:
    m = gpt()
    o = OptimConfig(**{"optimizer": "muon", "warmup_steps": 0, "decay_steps": 100, **optim})
    cfg = configure_optimizer(m, o, max_steps=100)
    return m, cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]


def test_muon_takes_the_hidden_matrices_adamw_the_rest():
    m, opt, _ = muon()
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, MuonFP32)  # CPU: float32
    hidden = {id(p) for p in muon_params(m)}
    in_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    in_adamw = [id(p) for g in opt.adamw.param_groups for p in g["params"]]
    assert in_muon == hidden and len(hidden) == 4 * MODEL["n_layer"]  # qkv, proj, fc, proj
    assert not in_muon & set(in_adamw) and len(in_adamw) == len(set(in_adamw))
    assert in_muon | set(in_adamw) == {id(p) for p in m.parameters()}
    assert id(m.wte.weight) in set(in_adamw)  # embeddings (and the tied head): AdamW
    # one list of groups: the scheduler and gradient clipping see every parameter
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_muon_schedule_scales_both_learning_rates():
    _, opt, sched = muon(lr=1e-3, min_lr=1e-4, muon_lr=0.02, warmup_steps=10)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 / 11)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 / 11)
    assert opt.param_groups[0] is opt.adamw.param_groups[0]  # logged `lr` is AdamW's
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02)


def test_muon_overfits_a_batch_and_its_state_round_trips():
    m, opt, _ = muon(lr=3e-3, muon_lr=0.02, weight_decay=0.0)
    torch.manual_seed(1)
    x = torch.randint(VOCAB, (4, 16))
    y = torch.roll(x, -1, dims=1)

    def closure():
        opt.zero_grad()
        _, loss = m(x, y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(60):
        loss = opt.step(closure)
    assert first == pytest.approx(math.log(VOCAB), abs=0.15)
    assert loss.item() < 0.2
    state = opt.state_dict()
    _, fresh, _ = muon(lr=3e-3, muon_lr=0.02, weight_decay=0.0)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["muon"]["state"].keys() == state["muon"]["state"].keys()
    assert all(
        torch.equal(a["momentum_buffer"], b["momentum_buffer"])
        for a, b in zip(
            fresh.state_dict()["muon"]["state"].values(),
            state["muon"]["state"].values(),
            strict=True,
        )
    )


def test_fp32_muon_matches_torch_muon():
    """MuonFP32 is torch.optim.Muon's update, only with float32 Newton-Schulz iterations."""
    torch.manual_seed(0)
    g = torch.randn(48, 16)
    o = orthogonalize(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.5 and s.max() < 1.5  # ~semi-orthogonal
    a, b, c = 3.4445, -4.775, 2.0315  # the textbook iteration, on the smaller Gram matrix
    x = g.T / g.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    assert torch.allclose(o, x.T, atol=1e-5)
    weights = [torch.randn(24, 8), torch.randn(8, 32)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    results = []
    for cls in (torch.optim.Muon, MuonFP32):
        ps = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = cls(ps, lr=0.02, weight_decay=0.1, momentum=0.95)
        for step_grads in grads:
            for p, gr in zip(ps, step_grads, strict=True):
                p.grad = gr.clone()
            opt.step()
        results.append(ps)
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=2e-3)  # bfloat16 vs float32 iterations


@pytest.mark.parametrize("key", ["lr", "min_lr", "weight_decay", "beta2", "muon_lr"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_numbers_are_rejected_up_front(key, value):
    with pytest.raises(UserError, match=f"optim.{key} must be a finite number"):
        OptimConfig(**{key: value})


def test_fused_adamw_only_without_mixed_precision():
    """Fused AdamW unscales gradients itself: under mixed precision Lightning could not clip."""
    model = torch.nn.Linear(4, 4)
    plain = configure_optimizer(model, OptimConfig(), max_steps=10)["optimizer"]
    mixed = configure_optimizer(model, OptimConfig(), 10, mixed_precision=True)["optimizer"]
    assert plain.defaults["fused"] is True
    assert not mixed.defaults["fused"] and mixed.defaults["foreach"] is not False

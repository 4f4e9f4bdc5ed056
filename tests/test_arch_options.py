"""The architecture options of GPTConfig (rotary, RMSNorm, ReLU², QK-norm, zero init, untied
head) and the optimizer options (Muon, warmup-stable-decay): each must be a working GPT in its
own right, held to the same checks as the classic block in test_model.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nanoforge.errors import UserError
from nanoforge.model import GPT, GPTConfig, KVCache, apply_rotary, rotary_tables
from nanoforge.module import GPTModule
from nanoforge.optim import (
    MuonAdamW,
    MuonFP32,
    OptimConfig,
    configure_optimizer,
    lr_at,
    muon_params,
    orthogonalize,
)
from nanoforge.tokenizer import CharTokenizer

VOCAB = 11
OPTIONS = {
    "rotary": {"position": "rotary"},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"activation": "relu2"},
    "qk_norm": {"qk_norm": True},
    "zero_init": {"zero_init": True},
    "untied": {"tie_head": False},
    "all": {
        "position": "rotary",
        "norm": "rmsnorm",
        "activation": "relu2",
        "qk_norm": True,
        "zero_init": True,
        "tie_head": False,
    },
}
IDS = list(OPTIONS)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster than two, and far faster on a busy machine
    (spinning OpenMP threads of several processes fight for the same cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    base = {"vocab_size": VOCAB, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
    return GPT(GPTConfig(**{**base, **kw})).eval()


def randomise(m: GPT) -> GPT:
    """Zero-initialised projections make every position look alike; give them weights so the
    leakage and cache checks below test something."""
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, 0.1)
    return m


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=IDS)
def test_shapes(opts):
    m = tiny(**opts)
    logits, loss = m(torch.randint(VOCAB, (3, 16)), torch.randint(VOCAB, (3, 16)))
    assert logits.shape == (3, 16, VOCAB) and loss.shape == ()
    logits, loss = m(torch.randint(VOCAB, (2, 5)))
    assert logits.shape == (2, 5, VOCAB) and loss is None


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=IDS)
def test_no_causal_leakage(opts):
    m = randomise(tiny(**opts))
    idx = torch.randint(VOCAB, (2, 16))
    for k in (1, 7, 15):
        changed = idx.clone()
        changed[:, k:] = (changed[:, k:] + 3) % VOCAB
        a, _ = m(idx)
        b, _ = m(changed)
        assert torch.equal(a[:, :k], b[:, :k])  # bit-identical before k
        assert not torch.allclose(a[:, k:], b[:, k:])


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=IDS)
def test_init_loss_is_ln_vocab(opts):
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, **opts)
    m = GPT(c).eval()
    _, loss = m(torch.randint(65, (8, 64)), torch.randint(65, (8, 64)))
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=IDS)
def test_overfits_one_batch(opts):
    m = tiny(**opts).train()
    torch.manual_seed(1)
    x = torch.randint(VOCAB, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(120):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=IDS)
def test_cached_decoding_equals_full_forward(opts, attention):
    """The KV cache must hold keys exactly as the full forward sees them: with rotary, keys
    rotated by their absolute position (and normalised first, with QK-norm)."""
    m = randomise(tiny(attention=attention, **opts))
    idx = torch.randint(VOCAB, (2, 12))
    full, _ = m(idx)
    cache = KVCache(m.config.n_layer)
    prefix, _ = m(idx[:, :5], cache=cache)
    assert torch.allclose(prefix, full[:, :5], atol=1e-5)
    for t in range(5, 9):
        step, _ = m(idx[:, t : t + 1], cache=cache)
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-5)
    chunk, _ = m(idx[:, 9:12], cache=cache)  # several new tokens after a cached prefix
    assert torch.allclose(chunk, full[:, 9:12], atol=1e-5)


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=IDS)
def test_greedy_generation_with_cache_equals_recompute(opts):
    m = randomise(tiny(**opts))
    prompt = torch.randint(VOCAB, (2, 3))
    n = 40  # past the 16-token window: the cache is rebuilt several times
    cached = torch.stack(list(m.generate(prompt, n, temperature=0)), 1)
    # recompute, window by window, the way the cache drops the oldest quarter
    plain = torch.stack(list(m.generate(prompt, 13, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached[:, :13], plain)
    assert cached.shape == (2, n) and int(cached.max()) < VOCAB


def test_rotary_scores_depend_on_distance_only():
    torch.manual_seed(0)
    cos, sin = rotary_tables(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        qm = apply_rotary(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    assert torch.allclose(score(5, 2), score(20, 17), atol=1e-5)
    assert torch.allclose(score(3, 3), (q * k).sum(), atol=1e-5)  # distance 0: plain q·k
    assert not torch.allclose(score(5, 2), score(5, 4))
    x = torch.randn(2, 3, 7, 8)
    assert torch.allclose(apply_rotary(x, cos[:7], sin[:7]).norm(dim=-1), x.norm(dim=-1))


def test_rotary_has_no_position_parameters_and_keeps_the_checkpoint_format():
    m = tiny(position="rotary")
    assert m.wpe is None
    assert not any("rope" in k for k in m.state_dict())  # the tables are rebuilt, not saved
    classic = tiny()
    assert m.num_params() == classic.num_params()  # positions are not counted either way
    assert m.num_params(non_embedding=False) == classic.num_params(non_embedding=False) - 16 * 16


def test_untied_head_and_zero_init():
    untied = tiny(tie_head=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() == tiny().num_params() + VOCAB * 16
    z = tiny(zero_init=True, tie_head=False)
    for b in z.blocks:
        assert not b.attn.c_proj.weight.any() and not b.mlp.c_proj.weight.any()
        assert b.attn.c_attn.weight.std() > 0.01  # the rest keeps the GPT-2 init
    assert not z.lm_head.weight.any()
    x = torch.randint(VOCAB, (2, 8))
    logits, _ = z(x)
    assert torch.equal(logits, torch.zeros_like(logits))  # exactly uniform at the start


def test_rmsnorm_and_relu2_are_what_they_say():
    m = tiny(norm="rmsnorm", activation="relu2")
    assert isinstance(m.blocks[0].ln_1, torch.nn.RMSNorm) and isinstance(m.ln_f, torch.nn.RMSNorm)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(m.blocks[0].mlp.act(x), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0]))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"position": "alibi"}, "position"),
        ({"norm": "batchnorm"}, "norm"),
        ({"activation": "swish"}, "activation"),
        ({"position": "rotary", "n_embd": 12, "n_head": 4}, "even head size"),
    ],
)
def test_bad_option_named(kw, match):
    with pytest.raises(UserError, match=match):
        GPTConfig(**kw)


# --- optimizer options ------------------------------------------------------------------

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
MODEL = {"vocab_size": TOK.vocab_size, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def muon_module(**optim) -> tuple[GPTModule, MuonAdamW, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    m = GPTModule(
        model=MODEL,
        optim={"optimizer": "muon", "warmup_steps": 0, "decay_steps": 100, **optim},
        tokenizer=TOK.state_dict(),
    )
    cfg = configure_optimizer(m.model, m.optim_config, max_steps=100)
    return m, cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]


def test_muon_takes_the_hidden_matrices_adamw_the_rest():
    m, opt, _ = muon_module()
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, MuonFP32)  # CPU: float32
    hidden = {id(p) for p in muon_params(m.model)}
    in_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    in_adamw = [id(p) for g in opt.adamw.param_groups for p in g["params"]]
    assert in_muon == hidden and len(hidden) == 4 * MODEL["n_layer"]  # qkv, proj, fc, proj
    assert not in_muon & set(in_adamw) and len(in_adamw) == len(set(in_adamw))
    assert in_muon | set(in_adamw) == {id(p) for p in m.model.parameters()}
    assert id(m.model.wte.weight) in set(in_adamw)  # embeddings (and the tied head): AdamW
    # one list of groups: the scheduler and gradient clipping see every parameter
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.model.parameters()))


def test_muon_schedule_scales_both_learning_rates():
    _, opt, sched = muon_module(lr=1e-3, min_lr=1e-4, muon_lr=0.02, warmup_steps=10)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 / 11)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 / 11)
    assert opt.param_groups[0] is opt.adamw.param_groups[0]  # logged `lr` is AdamW's
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02)


def test_muon_overfits_a_batch_and_its_state_round_trips():
    m, opt, _ = muon_module(lr=3e-3, muon_lr=0.02, weight_decay=0.0)
    torch.manual_seed(1)
    x = torch.randint(TOK.vocab_size, (4, 16))
    y = torch.roll(x, -1, dims=1)

    def closure():
        opt.zero_grad()
        _, loss = m(x, y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(60):
        loss = opt.step(closure)
    assert first == pytest.approx(math.log(TOK.vocab_size), abs=0.15)
    assert loss.item() < 0.2
    state = opt.state_dict()
    _, fresh, _ = muon_module(lr=3e-3, muon_lr=0.02, weight_decay=0.0)
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


def test_wsd_schedule_warmup_stable_cooldown():
    lr, min_lr, warm, total = 1e-3, 1e-4, 10, 110
    lrs = [lr_at(s, lr, min_lr, warm, total, "wsd", 0.2) for s in range(130)]
    assert lrs[0] == pytest.approx(lr / 11)
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # warmup
    assert lrs[10:88] == [lr] * 78  # stable until the last 20% (22 steps) of 110
    assert all(a > b for a, b in itertools.pairwise(lrs[88:111]))  # linear cool-down
    assert lrs[99] == pytest.approx(lr - (11 / 22) * (lr - min_lr))
    assert lrs[110] == lrs[129] == min_lr


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"schedule": "step"}, "optim.schedule"),
        ({"optimizer": "sgd"}, "optim.optimizer"),
        ({"cooldown_frac": 1.5}, "cooldown_frac"),
    ],
)
def test_bad_optim_option_named(kw, match):
    with pytest.raises(UserError, match=match):
        OptimConfig(**kw)

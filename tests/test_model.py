import math

import pytest
import torch
from omegaconf import OmegaConf

from nanoforge.errors import UserError
from nanoforge.model import GPT, GPTConfig, KVCache, reference_attention
from tests.conftest import CONFIGS, compose

MODEL_CONFIGS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))


def model_cfg(name: str) -> dict:
    """`model=NAME` as Hydra composes it (the variants inherit model/default.yaml)."""
    return OmegaConf.to_container(compose([f"model={name}"]).model)


def cfg_of(name: str, **kw) -> GPTConfig:
    d = model_cfg(name)
    return GPTConfig(**{**d, **kw})


def closed_form_params(c: GPTConfig) -> int:
    """Parameter count from the architecture alone (tied head counted once, positions excluded)."""
    d, L, V = c.n_embd, c.n_layer, c.vocab_size
    per_block = 12 * d * d + (13 * d if c.bias else 2 * d)  # attn 4d², mlp 8d², LN/bias terms
    final_ln = 2 * d if c.bias else d
    return V * d + L * per_block + final_ln


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(
            **{"vocab_size": 11, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16, **kw}
        )
    ).eval()


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_param_count_matches_closed_formula(name):
    c = cfg_of(name, vocab_size=65)
    if name == "gpt2":
        c = cfg_of(name, vocab_size=50257)
    with torch.device("meta"):  # no memory for the 124M model
        m = GPT(c)
    assert m.num_params() == closed_form_params(c)
    assert m.num_params(non_embedding=False) == closed_form_params(c) + c.block_size * c.n_embd


def test_documented_sizes():
    with torch.device("meta"):
        assert round(GPT(cfg_of("small", vocab_size=65)).num_params() / 1e6, 2) == 0.80
        assert round(GPT(cfg_of("medium", vocab_size=65)).num_params() / 1e6, 1) == 10.7
        n_gpt2 = GPT(cfg_of("gpt2", vocab_size=50257)).num_params(non_embedding=False)
        assert round(n_gpt2 / 1e6) == 124
        assert 0.08e6 < GPT(cfg_of("tiny", vocab_size=65)).num_params() < 0.12e6


def test_param_count_without_bias():
    c = GPTConfig(vocab_size=20, block_size=8, n_layer=3, n_head=2, n_embd=8, bias=False)
    assert GPT(c).num_params() == closed_form_params(c)


def test_head_is_tied_to_token_embedding():
    m = tiny()
    assert m.lm_head.weight is m.wte.weight


def test_init_loss_is_ln_vocab():
    torch.manual_seed(0)
    c = cfg_of("small", vocab_size=65)
    m = GPT(c).eval()
    idx = torch.randint(65, (8, c.block_size))
    _, loss = m(idx, torch.randint(65, (8, c.block_size)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_residual_projections_have_scaled_init():
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=10, block_size=8, n_layer=8, n_head=4, n_embd=256)
    m = GPT(c)
    std = m.blocks[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_no_causal_leakage(attention):
    m = tiny(attention=attention)
    idx = torch.randint(11, (2, 16))
    for k in (1, 5, 15):
        changed = idx.clone()
        changed[:, k:] = (changed[:, k:] + 3) % 11
        a, _ = m(idx)
        b, _ = m(changed)
        assert torch.equal(a[:, :k], b[:, :k])  # bit-identical before k
        assert not torch.allclose(a[:, k:], b[:, k:])


def test_fast_attention_equals_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    assert torch.allclose(sdpa(q, k, v, is_causal=True), reference_attention(q, k, v), atol=1e-5)
    fast, ref = tiny(), tiny(attention="reference")
    ref.load_state_dict(fast.state_dict())
    idx = torch.randint(11, (3, 16))
    assert torch.allclose(fast(idx)[0], ref(idx)[0], atol=1e-5)


def test_reference_attention_scales_by_sqrt_head_dim():
    q = torch.tensor([[[[1.0, 1.0]]]])
    k = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    v = torch.tensor([[[[1.0], [0.0]]]])
    # one query attending to two keys (bottom-right aligned): scores 2/sqrt(2) and 0
    w = torch.softmax(torch.tensor([2 / math.sqrt(2), 0.0]), 0)
    assert torch.allclose(reference_attention(q, k, v), w[0].reshape(1, 1, 1, 1))


def test_cached_step_logits_match_full_forward():
    m = tiny()
    idx = torch.randint(11, (2, 12))
    full, _ = m(idx)
    cache = KVCache(m.config.n_layer)
    prefix, _ = m(idx[:, :5], cache=cache)
    assert torch.allclose(prefix, full[:, :5], atol=1e-5)
    for t in range(5, 12):
        step, _ = m(idx[:, t : t + 1], cache=cache)
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-5)
    # several new tokens after a cached prefix
    cache = KVCache(m.config.n_layer)
    m(idx[:, :4], cache=cache)
    chunk, _ = m(idx[:, 4:9], cache=cache)
    assert torch.allclose(chunk, full[:, 4:9], atol=1e-5)


def test_greedy_generation_with_cache_equals_recompute():
    m = tiny()
    prompt = torch.randint(11, (2, 3))
    n = m.config.block_size - 3  # within the context window
    cached = torch.stack(list(m.generate(prompt, n, temperature=0)), 1)
    plain = torch.stack(list(m.generate(prompt, n, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, plain)


def test_generation_past_context_length_keeps_working():
    m = tiny()
    out = torch.stack(list(m.generate(torch.zeros(1, 1, dtype=torch.long), 60, temperature=0)), 1)
    assert out.shape == (1, 60) and int(out.max()) < 11


def test_flops_per_token():
    c = cfg_of("small", vocab_size=65)
    m = GPT(c)
    assert m.flops_per_token() == 6 * m.num_params() + 12 * 4 * 128 * 64


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible"),
        ({"block_size": 0}, "block_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"attention": "flash9"}, "attention"),
    ],
)
def test_bad_model_config(kw, match):
    with pytest.raises(UserError, match=match):
        GPTConfig(**kw)


def test_unknown_model_key_named():
    with pytest.raises(UserError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 4})


def test_too_long_input_rejected():
    m = tiny()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_configs_keep_the_classic_block(name):
    """Every architecture option is spelled out (in model/default.yaml, which every model
    config inherits), switched off: the classic GPT-2 block is what `model=...` gives unless
    an experiment asks otherwise."""
    keys = ("position", "norm", "activation", "qk_norm", "zero_init", "tie_head")
    assert set(keys) <= set(model_cfg(name))
    c, d = cfg_of(name), GPTConfig()
    for key in keys:
        assert getattr(c, key) == getattr(d, key), key
    assert (c.position, c.norm, c.activation) == ("learned", "layernorm", "gelu")
    assert not c.qk_norm and not c.zero_init and c.tie_head

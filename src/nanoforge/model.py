"""Steps 3 to 6 of building a GPT (the README's table): the GPT itself, in plain PyTorch.

    token ids ─► token embedding + position embedding ─► dropout
              ─► n_layer × Block( x + Attention(LN(x)) ; x + MLP(LN(x)) )      (pre-LayerNorm)
              ─► final LayerNorm ─► LM head (weights tied to the token embedding) ─► logits

The token ids come from any tokenizer (``nanoforge.tokenizer``: characters, or byte-level BPE
up to GPT-2's 50,257 tokens); the model only sees ``vocab_size``. Every concept is one small
class. ``CausalSelfAttention`` runs PyTorch's fused
``scaled_dot_product_attention``; ``reference_attention`` is the same maths written out
(explicit causal mask + softmax), kept so tests can prove the fast path is right and so a
reader can see what the fused kernel computes. ``GPT.generate`` decodes with a KV cache.

That is the classic GPT-2 block, and the default. ``GPTConfig`` also switches on, one by one,
the changes that made modded-nanogpt and nanochat train faster (all off by default):
``position="rotary"`` (rotate q and k by their position instead of adding learned position
vectors), ``norm="rmsnorm"``, ``activation="relu2"`` (ReLU squared in the MLP), ``qk_norm``
(RMS-normalise q and k per head), ``zero_init`` (output projections start at zero, so every
block starts as the identity) and ``tie_head=False`` (a separate LM head).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanoforge.errors import UserError

# Sizes no real model reaches; a config beyond them (a crafted checkpoint or config.json) is
# refused before anything is allocated: block_size=4e9 alone would ask for ~1 TB.
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "block_size": 1 << 20,
    "n_layer": 1 << 10,
    "n_head": 1 << 10,
    "n_embd": 1 << 16,
}


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64  # context length: the most tokens the model attends over
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    attention: str = "sdpa"  # "sdpa" (fused kernel) or "reference" (explicit mask + softmax)
    # architecture options (the defaults are the classic GPT-2 block)
    position: str = "learned"  # "learned" (added embedding) or "rotary" (RoPE on q and k)
    rope_base: float = 10000.0  # rotary: the wavelength base of the lowest frequency
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    activation: str = "gelu"  # MLP: "gelu" (exact), "gelu_tanh" (GPT-2's tanh form) or "relu2"
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    zero_init: bool = False  # output projections (and an untied head) start at zero
    tie_head: bool = True  # the LM head shares the token embedding's weights
    # recompute each block's activations in the backward pass instead of keeping them
    # (non-reentrant torch.utils.checkpoint): less memory, one more forward pass of each block
    # in the backward; same gradients
    activation_checkpointing: bool = False

    def __post_init__(self):
        checks = [
            (self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}"),
            (self.block_size >= 1, f"model.block_size must be >= 1, got {self.block_size}"),
            (self.n_layer >= 1, f"model.n_layer must be >= 1, got {self.n_layer}"),
            (self.n_head >= 1, f"model.n_head must be >= 1, got {self.n_head}"),
            (self.n_embd >= 1, f"model.n_embd must be >= 1, got {self.n_embd}"),
            (
                self.n_embd % max(self.n_head, 1) == 0,
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})",
            ),
            (0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}"),
            (
                self.attention in ("sdpa", "reference"),
                f"model.attention must be 'sdpa' or 'reference', got {self.attention!r}",
            ),
            (
                self.position in ("learned", "rotary"),
                f"model.position must be 'learned' or 'rotary', got {self.position!r}",
            ),
            (
                self.position != "rotary" or (self.n_embd // max(self.n_head, 1)) % 2 == 0,
                f"model.position=rotary needs an even head size, got {self.n_embd}/{self.n_head}",
            ),
            (self.rope_base > 1.0, f"model.rope_base must be > 1, got {self.rope_base}"),
            (
                self.norm in ("layernorm", "rmsnorm"),
                f"model.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}",
            ),
            (
                self.activation in ("gelu", "gelu_tanh", "relu2"),
                f"model.activation must be 'gelu', 'gelu_tanh' or 'relu2', got {self.activation!r}",
            ),
        ]
        for key, limit in SIZE_LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"model.{key} must be a whole number, got {value!r}")
            checks.append((value <= limit, f"model.{key}={value:,} is above the limit {limit:,}"))
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention written out: softmax(q kᵀ / sqrt(d) + mask) v.

    q: (B, H, Tq, D), k and v: (B, H, Tk, D) with Tk >= Tq; query i sits at absolute position
    Tk - Tq + i and may attend to keys 0 .. that position (the newest queries are last).
    """
    tq, tk = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def rotary_tables(head_dim: int, positions: int, base: float = 10000.0):
    """cos and sin tables (positions, head_dim / 2) for rotary position embeddings (RoPE).

    Channel pair i of a head turns by angle ``pos · base^(-2i/head_dim)``: fast turns in the
    first pairs, slow ones in the last, so the dot product of a rotated query and key depends
    on their distance, not on where they sit.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its T positions: cos, sin are (T, D/2).

    The two halves of each head are the two coordinates of D/2 planes (GPT-NeoX layout).
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * w with its gradient written out: ``F.rms_norm`` is a chain of
    elementwise kernels on a CPU (square, mean, rsqrt, two products) that autograd
    differentiates one by one, saving each intermediate; the closed form below runs fewer
    kernels and keeps two tensors, which made it faster forward and back on the CPUs measured
    (bench/RESULTS.md, "What each idea is worth"; ``tests/test_model.py`` checks it against
    ``F.rms_norm``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # statistics in float32 at least, whatever the activations' precision
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        xhat = xf * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return (xhat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        gf = grad.to(xhat.dtype)
        grad_weight = (gf * xhat).reshape(-1, xhat.size(-1)).sum(0).to(weight.dtype)
        g = gf * weight
        # d/dx of x·rstd: rstd·(g − x̂·mean(g·x̂)), the projection out of x̂'s direction
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(grad.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain (no mean subtraction, no bias):
    ``nn.RMSNorm``'s parameters and result, a faster backward on CPU."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    Each layer's keys and values live in one buffer of ``capacity`` positions, allocated at the
    first update and written in place: a decoding step copies only its own new key and value
    (growing by ``torch.cat`` would copy the whole past, every layer, every token). Without a
    ``capacity`` (or past it) the buffer doubles, so appends stay cheap on average.
    """

    def __init__(self, n_layer: int, capacity: int | None = None):
        self.capacity = capacity
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.lengths = [0] * n_layer

    @property
    def length(self) -> int:
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's k, v (B, H, T, D) for ``layer``; return views of all keys and
        values so far (B, H, length, D)."""
        start = self.lengths[layer]
        end = start + k.size(-2)
        buf = self.layers[layer]
        if buf is None or end > buf[0].size(-2):
            size = max(end, self.capacity or 0, 2 * start)
            shape = (*k.shape[:-2], size, k.size(-1))
            grown = (k.new_empty(shape), v.new_empty(shape))
            if buf is not None:
                grown[0][..., :start, :] = buf[0][..., :start, :]
                grown[1][..., :start, :] = buf[1][..., :start, :]
            self.layers[layer] = buf = grown
        buf[0][..., start:end, :] = k
        buf[1][..., start:end, :] = v
        self.lengths[layer] = end
        return buf[0][..., :end, :], buf[1][..., :end, :]


class SlotKVCache:
    """Keys and values of many independent streams, one *slot* each, for serving.

    Each slot holds one stream at its own position; a forward pass takes one new token for
    each slot in ``rows`` (set by :meth:`begin`), writes its key and value at that slot's
    position and lets it attend to its own past only. Buffers are allocated once, at
    ``block_size`` positions per slot, and written in place. Attention runs slot by slot on
    exactly the keys a single-stream :class:`KVCache` would hold, so each stream's numbers are
    the ones it gets decoding alone (``nanoforge.serving`` relies on it).
    """

    def __init__(self, config: GPTConfig, slots: int, dtype=torch.float32, device="cpu"):
        shape = (slots, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.lengths = [0] * slots  # positions filled in each slot
        self.rows: list[int] = []  # the slot of each row of the next forward pass
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self._slots = self.positions
        self.groups: list[list[int]] = []

    def begin(self, rows: list[int]) -> None:
        """The next forward pass feeds one token to each of these slots, in this order.

        Neighbouring rows in neighbouring slots at the same length attend in one call: on one
        CPU thread the fused kernel computes each (row, head) alone, the same bits as a batch
        of one; on several threads (or a GPU) it may split the work otherwise, so there each
        row attends alone.
        """
        self.rows = rows
        device = self.k[0].device
        lengths = [self.lengths[s] for s in rows]
        self.positions = torch.tensor(lengths, device=device)
        self._slots = torch.tensor(rows, device=device)
        together = device.type == "cpu" and torch.get_num_threads() == 1
        groups: list[list[int]] = []  # [first row, end row, first slot, keys]
        for r, (s, n) in enumerate(zip(rows, lengths, strict=True)):
            g = groups[-1] if groups else None
            if together and g and g[3] == n + 1 and g[2] + (r - g[0]) == s:
                g[1] = r + 1
            else:
                groups.append([r, r + 1, s, n + 1])
        self.groups = groups

    def advance(self) -> None:
        """The forward pass is done: each of its slots is one token longer."""
        for s in self.rows:
            self.lengths[s] += 1

    def load(self, slot: int, cache: KVCache) -> None:
        """Fill ``slot`` with a single-stream cache (a prompt's prefill, batch of one)."""
        n = cache.length
        for layer, (k, v) in enumerate(cache.layers):
            self.k[layer][slot, :, :n] = k[0, :, :n]
            self.v[layer][slot, :, :n] = v[0, :, :n]
        self.lengths[slot] = n

    def attend(self, layer: int, q, k, v, reference: bool = False) -> torch.Tensor:
        """Write this step's k, v (B, H, 1, D) at each row's slot and position; return each
        row's attention over its own slot (B, H, 1, D)."""
        kb, vb = self.k[layer], self.v[layer]
        if len(self.groups) == 1:  # one group: neighbouring slots, one position
            r0, r1, s, n = self.groups[0]
            kb[s : s + r1 - r0, :, n - 1] = k[:, :, 0]
            vb[s : s + r1 - r0, :, n - 1] = v[:, :, 0]
        else:
            kb[self._slots, :, self.positions] = k[:, :, 0]
            vb[self._slots, :, self.positions] = v[:, :, 0]
        out = []
        for r0, r1, s, n in self.groups:
            qr, kr, vr = q[r0:r1], kb[s : s + r1 - r0, :, :n], vb[s : s + r1 - r0, :, :n]
            if reference:
                out.append(reference_attention(qr, kr, vr))
            else:
                out.append(F.scaled_dot_product_attention(qr, kr, vr))
        return out[0] if len(out) == 1 else torch.cat(out)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled = True  # init scaled by 1/sqrt(2 n_layer), see GPT
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_reference = config.attention == "reference"
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | SlotKVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # unit RMS per head: attention logits stay bounded
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:  # rotate by absolute position; the cache keeps rotated keys
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if isinstance(cache, SlotKVCache):  # serving: each row a stream of its own
            y = cache.attend(layer, q, k, v, self.use_reference)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if self.use_reference:
            y = reference_attention(q, k, v)
            y = F.dropout(y, dropout, self.training) if dropout else y
        elif k.size(-2) == T:  # no past: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:  # one new token attends to every cached one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # several new tokens after a cached prefix: bottom-right aligned causal mask
            mask = torch.ones(T, k.size(-2), dtype=torch.bool, device=x.device).tril(
                diagonal=k.size(-2) - T
            )
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class _ReLU2Function(torch.autograd.Function):
    """max(0, x)² keeping r = max(0, x) for the backward, 2·r·grad. Autograd's own path
    (``F.relu(x).square()``) differentiates ``square`` as a general power (``pow`` and its
    derivative), a slower kernel on a CPU than one multiply (bench/RESULTS.md, "What each
    idea is worth")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return grad * (r + r)


class ReLU2(nn.Module):
    """ReLU squared, max(0, x)²: sparse like ReLU, smooth at 0 (modded-nanogpt, Primer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU2Function.apply(x)


class MLP(nn.Module):
    """Position-wise feed-forward network: expand 4x, GELU (exact or tanh) or ReLU², back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        if config.activation == "relu2":
            self.act = ReLU2()
        else:  # gelu_tanh: the tanh approximation GPT-2 was trained with (its weights need it)
            self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block: pre-LayerNorm attention and MLP, each on a residual path."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | SlotKVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2 style decoder-only transformer over any token vocabulary (characters, BPE,
    GPT-2's own): ``config`` sets its size and which architecture options are on."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        if config.position == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned positions
        else:  # rotary: no position parameters, fixed angle tables (not saved in checkpoints)
            self.wpe = None
            cos, sin = rotary_tables(
                config.n_embd // config.n_head, config.block_size, config.rope_base
            )
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix in, the same out
        else:
            self.lm_head.zero_init = True  # an untied head starts at zero under zero_init
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02); projections into the residual stream are scaled by
        # 1/sqrt(2 n_layer) so the stream's variance does not grow with depth. With
        # zero_init they start at zero instead: each block begins as the identity.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scaled", False):
                std /= math.sqrt(2 * self.config.n_layer)
            zero = self.config.zero_init and (
                getattr(module, "residual_scaled", False) or getattr(module, "zero_init", False)
            )
            if zero:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def prepare_decoding(self, dtype: torch.dtype | None = None) -> GPT:
        """Make this model (in place) faster to sample from on a CPU; returns it.

        At batch 1 each Linear is a matrix-vector product that streams its weight once, and
        how fast MKL streams it depends on the weight's memory order. Each Linear that does
        not shrink its input (attention's q/k/v and output, the MLP's first layer, the LM
        head) gets its (out, in) weight stored input-major, the memory order of its
        transpose, as ``transformers``' GPT-2 ``Conv1D`` keeps it, which MKL streams faster
        at batch 1; the MLP's 4x-wide-to-narrow projection is faster as it is (both measured:
        bench/RESULTS.md, "What each idea is worth"). Values, shapes and the state_dict stay
        the same. A ``dtype`` (``torch.bfloat16``) also casts the weights: half the bytes to
        stream.
        """
        if dtype is not None:
            self.to(dtype)
        for module in self.modules():
            if (
                isinstance(module, nn.Linear)
                and module.out_features >= module.in_features
                and module.weight.is_contiguous()
            ):
                w = module.weight  # a tied head is wte's Parameter: one change serves both
                w.data = w.data.t().contiguous().t()
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (the tied head counted once). ``non_embedding`` drops positions,
        as nanoGPT and the scaling-law papers report it (rotary positions have none)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 N + 12 L d T (PaLM, appendix B)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | SlotKVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and the mean cross-entropy
        against ``targets`` (B, T) when given. With ``cache``, idx are the *new* tokens.
        ``last_only``: logits of the last position only, (B, 1, vocab): all that sampling
        needs, and the LM head is the largest matrix (a 50-token prompt at GPT-2 size would
        otherwise cost 50 x 39M multiply-adds for 49 rows of logits thrown away)."""
        x = self.trunk(idx, cache)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def trunk(self, idx: torch.Tensor, cache: KVCache | SlotKVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final normalised hidden states (B, T, n_embd): everything but
        the LM head, so a caller that needs logits at a few positions only (the harness's
        continuation tokens) runs the largest matrix on those rows alone."""
        T = idx.size(1)
        if isinstance(cache, SlotKVCache):  # one token per row, each at its slot's position
            return self._forward_slots(idx, cache)
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}"
            )
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe.weight[start : start + T]  # = wpe(arange), no gather
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        recompute = self.config.activation_checkpointing and self.training and cache is None
        for i, block in enumerate(self.blocks):
            if recompute and torch.is_grad_enabled():
                x = checkpoint(block, x, None, i, rope, use_reentrant=False)
            else:
                x = block(x, cache, i, rope)
        return self.ln_f(x)

    def _forward_slots(self, idx: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """``trunk`` for a :class:`SlotKVCache`: idx (B, 1), row i at position
        ``cache.positions[i]``; hidden states (B, 1, n_embd). The cache's lengths advance."""
        pos = cache.positions
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe.weight[pos][:, None]
        else:  # (B, 1, 1, D/2): broadcast over heads
            rope = (self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None])
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, rope)
        cache.advance()
        return self.ln_f(x)

    @torch.inference_mode()  # no autograd bookkeeping at all: less work per token than no_grad
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ):
        """Yield (B,) new token ids one step at a time, each sampled from the model.

        With ``use_cache`` the keys and values of past tokens are kept, so each step runs the
        model on one new token. When the context window is full, the oldest quarter is
        dropped and the cache rebuilt from the remaining tokens (positions are absolute, so a
        cache cannot simply slide). Without the cache, every step re-runs the last
        ``block_size`` tokens, as nanoGPT does.
        """
        from nanoforge.sampling import sample_next

        block = self.config.block_size
        keep = max(1, block - block // 4)
        context = idx
        cache: KVCache | None = None
        # the cache never holds more than block_size positions, nor more than this call needs
        capacity = min(block, idx.size(1) + max_new_tokens)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(context[:, -block:], last_only=True)
            elif cache is None or cache.length >= block:
                cache = KVCache(self.config.n_layer, capacity)
                logits, _ = self(
                    context[:, -(keep if context.size(1) >= block else block) :],
                    cache=cache,
                    last_only=True,
                )
            else:
                logits, _ = self(context[:, -1:], cache=cache, last_only=True)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            context = torch.cat([context, nxt[:, None]], dim=1)
            yield nxt


def expected_shapes(config: GPTConfig) -> dict[str, torch.Size]:
    """Each weight's shape in a ``GPT(config)``, from a model built on the meta device (no
    memory). Its weight initialisation is skipped: initialising meta tensors runs PyTorch's
    Python decompositions, which import ``torch._dynamo`` (over half a second of every
    ``generate.py`` start; bench/startup.py)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return {k: v.shape for k, v in GPT(config).state_dict().items()}
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)

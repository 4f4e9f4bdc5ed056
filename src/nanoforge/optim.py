"""The optimizer and its learning-rate schedule: everything ``configs/optim/`` sets.

- :class:`OptimConfig` is ``cfg.optim``, checked: one field per key of ``configs/optim/*.yaml``.
- :func:`param_groups`: weight decay on matrices only (nanoGPT's decay / no-decay groups).
- :func:`lr_at`: the schedule, a pure function of the step: linear warmup, then
  warmup-stable-decay (``wsd``, the default) or a half cosine (``cosine``, nanoGPT's).
  :func:`cooldown_start` and :func:`first_difference` say where two plans part: what lets a
  finished ``wsd`` run be extended as if it had been planned longer (docs/extending-runs.md).
- :func:`configure_optimizer`: AdamW (or Muon + AdamW) and the per-step scheduler, in the form
  Lightning's ``configure_optimizers`` returns.

Muon (Keller Jordan, used by modded-nanogpt and nanochat) replaces each 2-D weight's momentum
update by the nearest semi-orthogonal matrix (all singular values ~1), found with a few
Newton-Schulz iterations: every direction of the matrix moves by the same amount, which
trains the hidden layers in fewer steps than Adam. Embeddings, the LM head, biases and norm
gains are not "hidden matrices" and stay with AdamW. ``torch.optim.Muon`` runs its
Newton-Schulz iterations in bfloat16: fast on GPUs, but emulated (and many times slower) on
CPUs without native bfloat16 matrix units; :class:`MuonFP32` is the same update in float32
(bench/RESULTS.md has the measured cost of both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanoforge.errors import UserError


@dataclass
class OptimConfig:
    """``cfg.optim``, checked. The defaults are ``configs/optim/adamw.yaml``'s."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None  # where the decay ends; None = trainer.max_steps
    fused: bool | None = None  # fused AdamW kernel; None = use it where PyTorch has one
    # "wsd": warmup, stable at lr, then a linear cool-down to min_lr over the last
    # cooldown_frac of decay_steps (warmup-stable-decay). "cosine": warmup, then half cosine.
    schedule: str = "wsd"
    cooldown_frac: float = 0.2
    # "adamw", or "muon": Muon for the 2-D weights inside the blocks, AdamW (lr,
    # betas, weight_decay above) for embeddings, head, biases and norm gains.
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    # Newton-Schulz in float32 (MuonFP32); None = float32 except on CUDA, where
    # torch.optim.Muon's bfloat16 iterations are fast (see the module docstring)
    muon_fp32: bool | None = None

    def __post_init__(self):
        numbers = ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "muon_lr")
        for key in (*numbers, "muon_momentum", "muon_weight_decay", "cooldown_frac"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"optim.{key} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise UserError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in ("cosine", "wsd"):
            raise UserError(f"optim.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise UserError(f"optim.cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if self.optimizer not in ("adamw", "muon"):
            raise UserError(f"optim.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if not self.muon_lr > 0 or self.muon_weight_decay < 0:
            raise UserError("optim.muon_lr must be > 0 and optim.muon_weight_decay >= 0")


def lr_at(
    step: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
    schedule: str = "wsd",
    cooldown_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from lr/(warmup+1) to lr over ``warmup_steps`` steps, then down to
    ``min_lr`` at ``decay_steps`` and ``min_lr`` for ever after. "cosine" goes down along a
    half cosine; "wsd" stays at lr and decays linearly over the last ``cooldown_frac`` of
    ``decay_steps`` only.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    if schedule == "wsd":
        start = wsd_cooldown_start(warmup_steps, decay_steps, cooldown_frac)
        if step < start:
            return lr
        progress = (step - start) / max(1, decay_steps - start)
        return lr - progress * (lr - min_lr)
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def wsd_cooldown_start(warmup_steps: int, decay_steps: int, cooldown_frac: float) -> int:
    """The step where warmup-stable-decay's cool-down begins: the last ``cooldown_frac`` of
    ``decay_steps``, never inside the warmup. It never moves earlier when ``decay_steps``
    grows, which is what lets a finished run be extended exactly (:func:`cooldown_start`)."""
    return max(warmup_steps, decay_steps - round(cooldown_frac * decay_steps))


def schedule_length(config: OptimConfig, max_steps: int) -> int:
    """Where the decay ends: ``optim.decay_steps``, else the run's ``trainer.max_steps``."""
    return config.decay_steps or max(1, max_steps)


def cooldown_start(config: OptimConfig, max_steps: int) -> int | None:
    """The step where a ``wsd`` run's cool-down begins (None for ``cosine``, which decays from
    the end of the warmup on).

    Up to this step a run follows the same schedule as any run planned longer (warmup, then
    the peak LR), and it draws the same batches (the stream is indexed by step): the
    training state saved here (``checkpoints/cooldown_start.ckpt``,
    :class:`nanoforge.callbacks.RunCheckpoint`) is the state of the longer run at this step,
    so a finished run extended from it retraces the longer run exactly.
    """
    if config.schedule != "wsd":
        return None
    length = schedule_length(config, max_steps)
    return wsd_cooldown_start(config.warmup_steps, length, config.cooldown_frac)


def lr_factor(step: int, config: OptimConfig, max_steps: int) -> float:
    """The multiplier of the base LR at ``step``: what the scheduler applies to each group."""
    o = config
    length = schedule_length(o, max_steps)
    return lr_at(step, o.lr, o.min_lr, o.warmup_steps, length, o.schedule, o.cooldown_frac) / o.lr


def first_difference(
    old: OptimConfig, old_max_steps: int, new: OptimConfig, new_max_steps: int, upto: int
) -> int | None:
    """The first step in ``[0, upto]`` where the two schedules give another LR multiplier,
    or None when they agree on all of them: then a run resumed at ``upto`` under ``new``
    trains exactly as a run planned with ``new`` from the start would."""
    if old == new and schedule_length(old, old_max_steps) == schedule_length(new, new_max_steps):
        return None
    for step in range(upto + 1):
        if lr_factor(step, old, old_max_steps) != lr_factor(step, new, new_max_steps):
            return step
    return None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>= 2-D: linear and embedding weights) only; biases and
    LayerNorm gains are not decayed. Tied parameters appear once."""
    params = dict(model.named_parameters())  # named_parameters() de-duplicates tied weights
    decay = [p for p in params.values() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params.values() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- Muon
def orthogonalize(g: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """Approximately U Vᵀ for g = U S Vᵀ, by ``steps`` quintic Newton-Schulz iterations in
    float32 (the coefficients push every singular value towards ~1 quickly)."""
    a, b, c = coefficients
    x = g.float()
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        # x = a x + (b gram + c gram²) x, as two fused multiply-adds: 3 ops an iteration instead
        # of 8, ~20% less time for the small matrices of a CPU run (bench/RESULTS.md)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return (x if wide else x.T).to(g.dtype)


class MuonFP32(torch.optim.Muon):
    """``torch.optim.Muon`` (same arguments, state and update: Nesterov momentum, Newton-Schulz
    orthogonalisation, shape-adjusted LR, decoupled weight decay) computed in float32."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = orthogonalize(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                rows, cols = p.shape
                scale = {
                    None: max(1.0, rows / cols) ** 0.5,
                    "original": max(1.0, rows / cols) ** 0.5,
                    "match_rms_adamw": 0.2 * max(rows, cols) ** 0.5,
                }[group["adjust_lr_fn"]]
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * scale)
        return loss


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The hidden matrices Muon orthogonalises: 2-D weights inside the transformer blocks
    (attention and MLP projections). Embeddings and the LM head stay with AdamW."""
    return [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]


class MuonAdamW(torch.optim.Optimizer):
    """Muon for some parameters and AdamW for the rest, stepped as one optimizer: Lightning's
    automatic optimization (clipping, accumulation, the LR scheduler) drives one optimizer.

    ``param_groups`` lists AdamW's groups first, then Muon's; they are the inner optimizers'
    own group dicts, so the scheduler's LR changes reach both. State lives in the inner
    optimizers and checkpoints as ``{"adamw": ..., "muon": ...}``.
    """

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        params = [p for o in (adamw, muon) for g in o.param_groups for p in g["params"]]
        super().__init__([{"params": params}], {})
        self.adamw, self.muon = adamw, muon
        self.param_groups = [*adamw.param_groups, *muon.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]


def configure_optimizer(
    model: torch.nn.Module,
    config: OptimConfig,
    max_steps: int,
    device_type: str = "cpu",
    mixed_precision: bool = False,
) -> dict:
    """The optimizer for ``model`` and its per-step LR scheduler, as Lightning's
    ``configure_optimizers`` returns them.

    AdamW over the decay / no-decay groups; with ``optimizer="muon"`` the hidden matrices
    (:func:`muon_params`) go to Muon instead, and both are stepped as one
    :class:`MuonAdamW`. The schedule's length is ``decay_steps``, else ``max_steps``.

    Fused AdamW unscales gradients inside its own step, so under mixed precision Lightning
    cannot clip them first: ``fused=None`` then takes the foreach kernel instead.
    """
    o = config
    fused = o.fused
    if fused is None:  # fused AdamW exists on CPU and CUDA in recent PyTorch
        fused = not mixed_precision
    muon = muon_params(model) if o.optimizer == "muon" else []
    muon_ids = {id(p) for p in muon}
    groups = [
        {**g, "params": [p for p in g["params"] if id(p) not in muon_ids]}
        for g in param_groups(model, o.weight_decay)
    ]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=fused,
    )
    if muon:
        fp32 = o.muon_fp32 if o.muon_fp32 is not None else device_type != "cuda"
        opt = MuonAdamW(
            opt,
            (MuonFP32 if fp32 else torch.optim.Muon)(
                muon,
                lr=o.muon_lr,
                momentum=o.muon_momentum,
                weight_decay=o.muon_weight_decay,
            ),
        )
    # one multiplier for every group: Muon's LR follows the same warmup and decay shape
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

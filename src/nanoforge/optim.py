"""Muon for the hidden matrices, AdamW for everything else, as one optimizer.

Muon (Keller Jordan, used by modded-nanogpt and nanochat) replaces each 2-D weight's momentum
update by the nearest semi-orthogonal matrix (all singular values ~1), found with a few
Newton-Schulz iterations: every direction of the matrix moves by the same amount, which
trains the hidden layers in fewer steps than Adam. Embeddings, the LM head, biases and norm
gains are not "hidden matrices" and stay with AdamW.

``torch.optim.Muon`` runs its Newton-Schulz iterations in bfloat16: fast on GPUs, but on a
CPU without native bfloat16 matrix units (AVX2 only, like this project's machine) bfloat16
matmuls are emulated and one optimizer step of the 0.8M-parameter model took 2.4 s instead of
~0.06 s (bench/RESULTS.md). ``MuonFP32`` is the same update with the iterations in float32.
"""

from __future__ import annotations

import torch


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
        x = a * x + (b * gram + c * gram @ gram) @ x
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

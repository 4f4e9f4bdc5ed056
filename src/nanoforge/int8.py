"""Int8 weight-only Linear layers for sampling on a CPU: ``generate.py dtype=int8``.

At batch 1 a decoding step is a chain of matrix-vector products, each streaming its whole
weight from memory once, so tokens/s follows the bytes per weight: float32 4, bfloat16 2,
int8 1. Here each Linear weight is rounded to int8 with one scale per output row
(symmetric, ``scale = max |w_row| / 127`` stored in bfloat16: the row's largest weight maps
to ±127), activations stay bfloat16, and the product runs in PyTorch's own weight-only int8
CPU kernel, ``torch._weight_int8pack_mm``. The token embedding stays a bfloat16 table (a
tied head gets its own int8 copy), so a GPT-2-sized model holds ~0.4x float32's bytes while
each token streams ~0.25x. That kernel reads the int8 weight and dequantizes it
inside the GEMM, never writing a wider copy; it is what ``torch.compile`` lowers torchao's
int8 weight-only layout to on a CPU. torchao without ``torch.compile`` dequantizes the whole
weight to bfloat16 every call, which measured slower than float32 (bench/RESULTS.md).

The kernel has two limits this module stays inside, both measured on torch 2.13
(tests/test_int8.py covers them):

* activations and scales in bfloat16. With float32 activations the kernel takes a slow
  path, slower than a plain float32 matmul (bench/RESULTS.md, the int8 entry of the log).
* an input width that is a multiple of 16. Other widths give wrong numbers or crash in the
  kernel, unchecked; such a layer dequantizes its weight and runs ``F.linear`` instead:
  the same numbers, slower (a warning says so). Since other CPUs and torch versions run
  other kernel code, each layer's kernel is also checked once against the plain product
  when it is quantized, and a layer that disagrees falls back the same way.

The kernel wins at one row, where a product is all weight streaming. At 8 rows it ties or
trails a bfloat16 matmul, and at 50 (a prompt's prefill, once) it is slower: ``dtype=int8``
is for one sample at a time, ``bfloat16`` for many (figures: bench/RESULTS.md).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_WIDTH_MULTIPLE = 16  # torch._weight_int8pack_mm is wrong for other input widths


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one bfloat16 scale per output feature."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        # the scale the product will use (rounded to dtype) is the one the weights are
        # rounded against: then every weight is within half a step of its int8 value
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(dtype)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q.contiguous())  # (out, in) int8
        self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)
        self.kernel_ok = self.in_features % KERNEL_WIDTH_MULTIPLE == 0 and self._kernel_agrees()
        if not self.kernel_ok and dtype == torch.bfloat16:
            warnings.warn(
                f"int8: a Linear of input width {self.in_features} cannot use PyTorch's int8 "
                "kernel (it needs a multiple of 16 and must match the plain product): it "
                "dequantizes its weight every call instead, slower than dtype=bfloat16",
                stacklevel=2,
            )

    @torch.no_grad()
    def _kernel_agrees(self) -> bool:
        """One row through the kernel against the plain product of the same int8 weights
        (other CPUs and torch versions run other kernel code than the one measured)."""
        if self.scale.dtype != torch.bfloat16 or self.qweight.device.type != "cpu":
            return False
        x = torch.randn(1, self.in_features, generator=torch.Generator().manual_seed(0))
        x = x.to(torch.bfloat16)
        fast = torch._weight_int8pack_mm(x, self.qweight, self.scale).float()
        plain = F.linear(x.float(), self.dequantized(torch.float32))
        return bool(((fast - plain).abs() <= 0.02 * plain.abs().max() + 1e-6).all())

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer multiplies by, in ``dtype`` (default: its activations')."""
        dtype = dtype or self.scale.dtype
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return self.kernel_ok and x.device.type == "cpu" and x.dtype == self.scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        if self.uses_kernel(x):
            rows = x.reshape(-1, self.in_features).contiguous()
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@torch.no_grad()
def quantize_int8_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an :class:`Int8Linear` rounded
    from its float32 weight, and cast the rest (embeddings, norms, rotary tables) to
    ``dtype``; returns the model. A head tied to the token embedding gets its own int8 copy:
    the embedding stays a ``dtype`` table to look rows up in."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child, dtype))
    return model.to(dtype)  # int8 buffers are not floating point: .to(dtype) leaves them

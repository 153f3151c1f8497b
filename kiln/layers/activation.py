"""Activation layers."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import ops


class SiluAndMul(nn.Module):
    """(T, 2I) [gate | up] → (T, I)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh(x)


def get_activation(name: str) -> nn.Module:
    """A plain (non-gated) activation by its Hugging Face name."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return GeluTanh()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unsupported activation function {name!r}; supported: gelu, gelu_new")

"""Activation layers."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import ops
from kiln.quant.fused_activation import Fp8Activation, Fp8OutputSpec, silu_and_mul_to_fp8


class SiluAndMul(nn.Module):
    """(T, 2I) [gate | up] → (T, I)."""

    def __init__(self) -> None:
        super().__init__()
        # Set by kiln/quant/activation_fusion.py when the output feeds one FP8 linear only:
        # forward then returns it quantised for that linear (an Fp8Activation).
        self.quantize_output: Fp8OutputSpec | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | Fp8Activation:
        if self.quantize_output is not None:
            return silu_and_mul_to_fp8(x, self.quantize_output)
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

"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import ops
from kiln.quant.fused_activation import Fp8Activation, Fp8OutputSpec, rms_norm_to_fp8


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        # Set by kiln/quant/activation_fusion.py when the output feeds one FP8 linear only:
        # the norm then returns it quantised for that linear (an Fp8Activation).
        self.quantize_output: Fp8OutputSpec | None = None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | Fp8Activation | tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        """Without a residual: norm(x). With one: (norm(x + residual), x + residual). The norm
        is an Fp8Activation when quantize_output is set; the residual stays in x's dtype."""
        if self.quantize_output is not None:
            out, new_residual = rms_norm_to_fp8(x, self.weight, self.eps, residual,
                                                self.quantize_output)
        else:
            out, new_residual = ops.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

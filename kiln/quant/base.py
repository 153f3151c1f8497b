"""How a linear layer stores and applies its weight. Quantisation schemes (FP8, INT8,
INT4) add methods here; the layers take a method and never special-case a scheme."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import ops


class UnquantizedLinearMethod:
    """A plain (out, in) weight in the model's dtype."""

    name = "none"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return ops.linear(x, layer.weight, bias)

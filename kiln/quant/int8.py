"""`int8-wo`: W8A16, symmetric int8 weights with float16 scales per output channel
(group_size -1) or per group of group_size inputs; activations stay in the compute dtype.
A calibrating build runs AWQ's scale search first (kiln/quant/awq.py, `awq`), except with
--gptq, whose layer-by-layer rounding does better alone (kiln/quant/gptq_sequential.py). The matmul
dequantises in registers: kiln/kernels/quant_linear.py via ops.

Parameters per linear layer (this rank's share, out × in; G = group size, in if -1):
    weight        int8 (out, in)
    weight_scale  float16 (out, in / G)      w = weight · scale (broadcast over each group)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kiln.kernels import ops
from kiln.quant.base import QuantMethod, make_parameter
from kiln.quant.config import register_quant_scheme
from kiln.quant.placement import WEIGHT_LAYOUT, FeatureLayout
from kiln.quant.quantize import check_group_size, int8_levels, int8_scales, quantize_int8
from kiln.quant.scheme_base import BuildQuantizedLinearMethod, QuantizedSchemeConfig, store


def scale_layout(group_size: int, groups: int) -> FeatureLayout:
    """Per-group scales split with the inputs; one per-channel scale is every rank's."""
    if group_size == -1:
        return FeatureLayout(output_dim=0, input_dim=None)
    return FeatureLayout(output_dim=0, input_dim=1, input_block=group_size)


def check_group_size_value(group_size: int) -> None:
    if group_size != -1 and group_size < 16:
        raise ValueError(f"group_size must be -1 (per channel) or ≥ 16, got {group_size}")


@register_quant_scheme
@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantizedSchemeConfig):
    scheme: ClassVar[str] = "int8-wo"

    group_size: int = -1
    awq: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group_size_value(self.group_size)

    def quantized_method(self) -> QuantMethod:
        return Int8WeightOnlyLinearMethod(self)


class Int8WeightOnlyLinearMethod(BuildQuantizedLinearMethod):
    prequantized_names = ("weight", "weight_scale")

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        group = check_group_size(self.config.group_size, input_size, layer.prefix)
        layer.weight = make_parameter((output_size, input_size), WEIGHT_LAYOUT, torch.int8)
        layer.weight_scale = make_parameter(
            (output_size, input_size // group), scale_layout(self.config.group_size, 0),
            torch.float16)
        layer.quant_group_size = group

    def grid(self, layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (int8_scales(weight, layer.quant_group_size),)

    def round_columns(self, layer: nn.Module, grid: tuple[torch.Tensor, ...],
                      columns: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        scale = grid[0][:, index // layer.quant_group_size]
        return int8_levels(columns, scale) * scale

    def store_quantized(self, layer: nn.Module, weight: torch.Tensor,
                        grid: tuple[torch.Tensor, ...]) -> None:
        q, scale = quantize_int8(weight, layer.quant_group_size, grid[0])
        store(layer.weight, q)
        store(layer.weight_scale, scale)

    def apply_quantized(self, layer: nn.Module, x: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        return ops.int8_weight_only_linear(x, layer.weight, layer.weight_scale, bias)

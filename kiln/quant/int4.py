"""`int4-wo`: W4A16, 4-bit weights in groups of group_size inputs (128 by default) with a
float16 scale and zero point per group: asymmetric round-to-nearest at build, w = (q − z)·s.
AWQ's activation-aware scale search (kiln/quant/calibration.py, `awq`) runs before the
rounding when the build calibrates. The matmul unpacks and dequantises in registers:
kiln/kernels/quant_linear.py via ops.

Parameters per linear layer (this rank's share, out × in; G = group size):
    qweight       uint8 (out, in / 2): input column 2j in the low nibble, 2j+1 in the high
    weight_scale  float16 (out, in / G)
    weight_zero   float16 (out, in / G), in units of q (8.0 when symmetric)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kiln.kernels import ops
from kiln.quant.base import QuantMethod, make_parameter
from kiln.quant.config import register_quant_scheme
from kiln.quant.int8 import check_group_size_value, scale_layout
from kiln.quant.placement import FeatureLayout, ShardPlacement
from kiln.quant.quantize import check_group_size, int4_grid, int4_levels, quantize_int4
from kiln.quant.scheme_base import BuildQuantizedLinearMethod, QuantizedSchemeConfig, store

PACKED_LAYOUT = FeatureLayout(output_dim=0, input_dim=1, input_block=2)


@register_quant_scheme
@dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantizedSchemeConfig):
    scheme: ClassVar[str] = "int4-wo"

    group_size: int = 128
    zero_point: bool = True
    awq: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group_size_value(self.group_size)

    def quantized_method(self) -> QuantMethod:
        return Int4WeightOnlyLinearMethod(self)


class Int4WeightOnlyLinearMethod(BuildQuantizedLinearMethod):
    prequantized_names = ("qweight", "weight_scale", "weight_zero")

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        if input_size % 2:
            raise ValueError(f"{layer.prefix}: int4 packs input pairs; {input_size} inputs is odd")
        group = check_group_size(self.config.group_size, input_size, layer.prefix)
        groups = input_size // group
        layout = scale_layout(self.config.group_size, groups)
        layer.qweight = make_parameter((output_size, input_size // 2), PACKED_LAYOUT, torch.uint8)
        layer.weight_scale = make_parameter((output_size, groups), layout, torch.float16)
        layer.weight_zero = make_parameter((output_size, groups), layout, torch.float16)
        layer.quant_group_size = group

    def grid(self, layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return int4_grid(weight, layer.quant_group_size, self.config.zero_point)

    def round_columns(self, layer: nn.Module, grid: tuple[torch.Tensor, ...],
                      columns: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        group = index // layer.quant_group_size
        scale, zero = grid[0][:, group], grid[1][:, group]
        return (int4_levels(columns, scale, zero) - zero) * scale

    def load_checkpoint_tensor(self, layer: nn.Module, name: str, loaded: torch.Tensor,
                               placement: ShardPlacement, source_name: str) -> None:
        super().load_checkpoint_tensor(layer, name, loaded, placement, source_name)
        layer.integer_zero_points = None  # new zero points: look again

    def store_quantized(self, layer: nn.Module, weight: torch.Tensor,
                        grid: tuple[torch.Tensor, ...]) -> None:
        packed, scale, zero = quantize_int4(weight, layer.quant_group_size,
                                            self.config.zero_point, grid)
        store(layer.qweight, packed)
        store(layer.weight_scale, scale)
        store(layer.weight_zero, zero)
        layer.integer_zero_points = None

    def apply_quantized(self, layer: nn.Module, x: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        return ops.int4_weight_only_linear(x, layer.qweight, layer.weight_scale,
                                           layer.weight_zero, bias,
                                           integer_zeros=integer_zero_points(layer, x))


def integer_zero_points(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether every zero point of the layer is a whole number, which the decode tensor-core
    kernel needs (kernels/skinny_int4.py: it subtracts 128 + z in bf16, whose step is 1
    there). True for kiln's builds, AWQ, GPTQ and compressed-tensors; GGUF Q4_1's are
    fractional. Looked at once per layer on its first fast-path call (one device sync), never
    inside a CUDA-graph capture (the answer is then False for that call: the other kernels)."""
    known = getattr(layer, "integer_zero_points", None)
    if known is not None:
        return known
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return False
    zero = layer.weight_zero
    layer.integer_zero_points = bool(torch.equal(zero, zero.round()))
    return layer.integer_zero_points

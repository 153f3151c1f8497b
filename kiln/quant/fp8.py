"""`fp8`: W8A8 with E4M3 weights (one float32 scale per output channel) and E4M3 activations
(one scale per token computed on the fly, or one calibrated per-tensor scale with
activation_scales="static"). The matmul: kiln/kernels/quant_linear.py via ops.fp8_linear.

Parameters per linear layer (this rank's share, out × in):
    weight        float8_e4m3fn (out, in)
    weight_scale  float32 (out,)
    input_scale   float32 (1,)      only with activation_scales == "static"

Fused layers (q|k|v, gate|up): per-channel weight scales fuse by row; static input scales of
the parts take the max (the parts share one input, so one scale must cover all of them).

The input is a tensor, quantised here (per token, or by input_scale), or an Fp8Activation that
its producer already quantised the same way (kiln/quant/activation_fusion.py): then the
matmul takes its E4M3 values and scales as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kiln.kernels import ops
from kiln.quant.base import QuantMethod, make_parameter
from kiln.quant.config import register_quant_scheme
from kiln.quant.fused_activation import Fp8Activation
from kiln.quant.placement import WEIGHT_LAYOUT, FeatureLayout, ShardPlacement
from kiln.quant.quantize import (
    FP8_DTYPE, fp8_channel_scales, fp8_levels, quantize_fp8_per_channel,
)
from kiln.quant.scheme_base import BuildQuantizedLinearMethod, QuantizedSchemeConfig, store

PER_OUTPUT = FeatureLayout(output_dim=0, input_dim=None)
PER_TENSOR = FeatureLayout(output_dim=None, input_dim=None)
ACTIVATION_SCALES = ("dynamic", "static")


@register_quant_scheme
@dataclass(frozen=True)
class Fp8Config(QuantizedSchemeConfig):
    scheme: ClassVar[str] = "fp8"

    activation_scales: str = "dynamic"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation_scales not in ACTIVATION_SCALES:
            raise ValueError(f"activation_scales must be one of {ACTIVATION_SCALES}, "
                             f"got {self.activation_scales!r}")

    def quantized_method(self) -> QuantMethod:
        return Fp8LinearMethod(self)


class Fp8LinearMethod(BuildQuantizedLinearMethod):
    def __init__(self, config: Fp8Config) -> None:
        super().__init__(config)
        self.static = config.activation_scales == "static"
        self.prequantized_names = ("weight", "weight_scale") + (
            ("input_scale",) if self.static else ())

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.weight = make_parameter((output_size, input_size), WEIGHT_LAYOUT, FP8_DTYPE)
        layer.weight_scale = make_parameter((output_size,), PER_OUTPUT, torch.float32)
        if self.static:
            layer.input_scale = make_parameter((1,), PER_TENSOR, torch.float32)
            layer.input_scale.data.zero_()  # parts fold in by max

    def load_checkpoint_tensor(self, layer: nn.Module, name: str, loaded: torch.Tensor,
                               placement: ShardPlacement, source_name: str) -> None:
        if name == "input_scale":
            value = loaded.float().reshape(-1).amax().reshape(1)
            layer.input_scale.data.copy_(torch.maximum(layer.input_scale.data, value))
            return
        super().load_checkpoint_tensor(layer, name, loaded, placement, source_name)

    def grid(self, layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (fp8_channel_scales(weight),)

    def round_columns(self, layer: nn.Module, grid: tuple[torch.Tensor, ...],
                      columns: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        scale = grid[0][:, None]
        return fp8_levels(columns, scale).float() * scale

    def store_quantized(self, layer: nn.Module, weight: torch.Tensor,
                        grid: tuple[torch.Tensor, ...]) -> None:
        q, scale = quantize_fp8_per_channel(weight, grid[0])
        store(layer.weight, q)
        store(layer.weight_scale, scale)

    def apply_quantized(self, layer: nn.Module, x: torch.Tensor | Fp8Activation,
                        bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, Fp8Activation):  # quantised by its producer (with input_scale if static)
            return ops.fp8_linear(x.values, layer.weight, layer.weight_scale, None, bias,
                                  x_scale=x.scale, out_dtype=x.dtype)
        input_scale = layer.input_scale if self.static else None
        return ops.fp8_linear(x, layer.weight, layer.weight_scale, input_scale, bias)


def check_fp8_device(device: torch.device | str | None = None) -> None:
    """Raise KilnError when `device` (default: the current GPU, if any) is a GPU without FP8
    (before sm_89, Ada/Hopper): FP8 weights or KV cache cannot run there."""
    from kiln.errors import KilnError

    device = torch.device(device) if device is not None else None
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda")
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise KilnError(f"FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                        f"{name} is {major}.{minor}: build with --quant int8-wo or int4-wo, "
                        f"and without --kv-cache-dtype fp8")

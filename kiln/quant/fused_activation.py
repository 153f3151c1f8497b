"""An activation that its producer quantised for the FP8 linear that reads it (W8A8, issue 11).

    RMSNorm / SiLU-and-mul ──(quantize_output set)──► Fp8Activation ──► FP8 linear
                                                       values E4M3 (T, K)     no quantisation
                                                       scale f32 (T, 1)       of its own

kiln/quant/activation_fusion.py decides which producers do this (an `Fp8OutputSpec` on the
layer); the layers call `rms_norm_to_fp8` / `silu_and_mul_to_fp8` here, which run the fused
Triton kernel on CUDA (kiln/kernels/fused_quant.py) and its torch reference elsewhere, with
the same switch as every op (kernels/ops.py: CUDA and not KILN_REFERENCE_KERNELS=1). The
quantisation is exactly the one the FP8 linear would have applied to the producer's output
(see fused_quant.py), so an engine computes the same numbers with the fusion as without.

An Fp8Activation is not a tensor on purpose: anything but an FP8 linear that receives one by
mistake fails loudly instead of computing on E4M3 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.kernels import fused_quant, ops


@dataclass(frozen=True, eq=False)
class Fp8Activation:
    """A (T, K) activation as E4M3 values and one float32 scale per token."""

    values: torch.Tensor  # (T, K) float8_e4m3fn: E4M3(clamp(y / scale, ±448))
    scale: torch.Tensor  # (T, 1) float32: per token (dynamic), or the static scale on every row
    dtype: torch.dtype  # the compute dtype y was in: the consuming linear's output dtype

    def dequantize(self) -> torch.Tensor:  # (T, K) in self.dtype
        """values · scale: what the FP8 linear multiplies by (for inspection and tests)."""
        return (self.values.float() * self.scale).to(self.dtype)


@dataclass(frozen=True, eq=False)
class Fp8OutputSpec:
    """On a producer layer (`quantize_output`): return an Fp8Activation for `consumer`."""

    consumer_name: str  # the consuming linear's module name, for messages and repr
    consumer: nn.Module = field(repr=False)  # an FP8 linear (kiln/quant/fp8.py)
    static: bool  # quantise by the consumer's input_scale, else per token

    def input_scale(self) -> torch.Tensor | None:  # (1,) float32
        # Read at every call, not kept: the consumer's parameter may move (model.to).
        return self.consumer.input_scale if self.static else None


def rms_norm_to_fp8(
    x: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None,  # (T, H)
    spec: Fp8OutputSpec,
) -> tuple[Fp8Activation, torch.Tensor | None]:
    """(quantised norm(x + residual) · weight, x + residual in x's dtype or None)."""
    fast = ops.use_fast_kernels(x)
    op = fused_quant.rms_norm_fp8 if fast else fused_quant.rms_norm_fp8_reference
    values, scale, new_residual = op(x, weight, eps, residual, spec.input_scale())
    return Fp8Activation(values, scale, torch.promote_types(weight.dtype, x.dtype)), new_residual


def silu_and_mul_to_fp8(x: torch.Tensor, spec: Fp8OutputSpec) -> Fp8Activation:
    """(T, 2I) [gate | up] → quantised silu(gate) · up, (T, I)."""
    fast = ops.use_fast_kernels(x)
    op = fused_quant.silu_and_mul_fp8 if fast else fused_quant.silu_and_mul_fp8_reference
    values, scale = op(x, spec.input_scale())
    return Fp8Activation(values, scale, x.dtype)

"""What the quantising schemes (fp8, int8-wo, int4-wo) share: their common config fields
(kiln/quant/README of the contract: lm-head choice, pre-quantised checkpoints, calibration
provenance, layers kept unquantised) and the build life of a layer quantised by kiln itself:

    load_checkpoint_tensor("weight")  → staged full precision (kiln/quant/quantize.py)
    (calibration may run the model here: `apply` multiplies by the staged weight)
    process_weights_after_loading     → round-to-nearest into the scheme's parameters, or
                                        GPTQ's rounding when calibration left the layer its
                                        inputs' second moment (--gptq, kiln/quant/gptq.py),
                                        or the weight calibration rounded already with its
                                        grid (--gptq, kiln/quant/gptq_sequential.py)

A pre-quantised checkpoint (prequantized=True) hands the scheme's own tensors instead, already
in its layout; they are copied in place and never re-quantised.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from kiln.quant.base import QuantMethod, UnquantizedLinearMethod
from kiln.quant.config import QuantConfig
from kiln.quant.gptq import gptq_round, take_calibration_gram, take_calibration_grid
from kiln.quant.layer_selection import layer_matches
from kiln.quant.placement import ShardPlacement, copy_into_place
from kiln.quant.quantize import (
    FULL_PRECISION,
    stage_full_precision_weight,
    take_full_precision_weight,
)

_UNQUANTIZED = UnquantizedLinearMethod()
LM_HEAD_PREFIX = "lm_head"


@dataclass(frozen=True)
class QuantizedSchemeConfig(QuantConfig):
    """Fields every quantising scheme has (the contract's manifest "quant" section)."""

    quantize_lm_head: bool = False
    prequantized: bool = False
    calibration: str | None = None  # the calibration source (name or file), if any
    calibration_samples: int = 0
    # Layers kept in the compute dtype: names or prefixes of names (kiln/quant/layer_selection.py).
    unquantized_layers: tuple[str, ...] = ()
    source_format: str | None = None  # a pre-quantised checkpoint's format
    gptq: bool = False  # rounded by GPTQ from the calibration data (kiln/quant/gptq.py)

    def __post_init__(self) -> None:
        if not isinstance(self.unquantized_layers, tuple):
            object.__setattr__(self, "unquantized_layers", tuple(self.unquantized_layers))
        if self.calibration_samples < 0:
            raise ValueError(f"calibration_samples must be ≥ 0, got {self.calibration_samples}")

    def linear_method(self, prefix: str) -> QuantMethod:
        if prefix == LM_HEAD_PREFIX and not self.quantize_lm_head:
            return _UNQUANTIZED
        if any(layer_matches(prefix, p) for p in self.unquantized_layers):
            return _UNQUANTIZED
        return self.quantized_method()

    @abc.abstractmethod
    def quantized_method(self) -> QuantMethod:
        """The method of a layer this scheme quantises."""


class BuildQuantizedLinearMethod(QuantMethod):
    """A scheme's method: quantises a staged full-precision weight at build, or takes a
    pre-quantised checkpoint's tensors."""

    # The tensors of a pre-quantised checkpoint (the scheme's parameters).
    prequantized_names: tuple[str, ...] = ()

    def __init__(self, config: QuantizedSchemeConfig) -> None:
        self.config = config

    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        return self.prequantized_names if self.config.prequantized else ("weight",)

    def load_checkpoint_tensor(self, layer: nn.Module, name: str, loaded: torch.Tensor,
                               placement: ShardPlacement, source_name: str) -> None:
        if not self.config.prequantized and name == "weight":
            stage_full_precision_weight(layer, loaded, placement, source_name)
        else:
            copy_into_place(getattr(layer, name), loaded, placement, source_name)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = take_full_precision_weight(layer)
        gram = take_calibration_gram(layer)
        grid = take_calibration_grid(layer)  # rounded already (gptq_sequential.py)
        if weight is None:
            return
        if gram is not None:
            weight, grid = self.round_with_gptq(layer, weight, gram)
        self.store_quantized(layer, weight, grid if grid is not None else self.grid(layer, weight))

    def round_with_gptq(self, layer: nn.Module, weight: torch.Tensor, gram: torch.Tensor
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(the (out, in) float32 weight rounded by GPTQ onto its grid, that grid)."""
        grid = self.grid(layer, weight)
        rounded = gptq_round(
            weight, gram, lambda columns, index: self.round_columns(layer, grid, columns, index),
            name=layer.prefix)
        return rounded, grid

    def fake_quantize_for(self, layer: nn.Module):
        """(out, in) float32 weight → the same rounded to nearest onto its own grid and
        dequantised, as this layer would store it (AWQ's search measures with it)."""
        def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
            index = torch.arange(weight.shape[1], device=weight.device)
            return self.round_columns(layer, self.grid(layer, weight), weight, index)
        return fake_quantize

    @abc.abstractmethod
    def grid(self, layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The scheme's grid for this (out, in) float32 weight: its scales (and zero points)
        as float32 tensors, computed before any rounding."""

    @abc.abstractmethod
    def round_columns(self, layer: nn.Module, grid: tuple[torch.Tensor, ...],
                      columns: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Weight columns (out, k) float32 of inputs `index` (k,) rounded onto `grid` and
        dequantised (what the quantised layer multiplies by)."""

    @abc.abstractmethod
    def store_quantized(self, layer: nn.Module, weight: torch.Tensor,
                        grid: tuple[torch.Tensor, ...]) -> None:
        """Round the (out, in) float32 weight onto `grid` into the layer's parameters
        (with the grid of that same weight: round-to-nearest)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        staged = getattr(layer, FULL_PRECISION, None)
        if staged is not None:  # before quantisation (calibration at build)
            staged = staged.to(device=x.device, dtype=x.dtype)
            return nn.functional.linear(x, staged, bias)
        return self.apply_quantized(layer, x, bias)

    @abc.abstractmethod
    def apply_quantized(self, layer: nn.Module, x: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """x @ dequantised weight^T (+ bias)."""


def store(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a quantised result (maybe on the GPU) into a layer's parameter."""
    param.data.copy_(value.to(device=param.device, dtype=param.dtype))

"""How a linear layer stores, loads and applies its weight. A quantisation scheme supplies a
`QuantMethod`; the layers take one and never special-case a scheme.

The life of a linear layer's weights:

    build:  create_weights → load_checkpoint_tensor (per checkpoint tensor, per fused part)
              → process_weights_after_loading (e.g. quantise the full-precision weight)
              → the engine file stores the layer's parameters as they are then
    load:   create_weights (on the meta device) → the engine's tensors are assigned
    serve:  apply

A method keeps no per-layer state of its own: everything lives on the layer, so one method
object may serve many layers.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch
from torch import nn

from kiln.kernels import ops
from kiln.quant.placement import WEIGHT_LAYOUT, FeatureLayout, ShardPlacement, copy_into_place


def make_parameter(
    shape: Sequence[int], layout: FeatureLayout, dtype: torch.dtype | None = None
) -> nn.Parameter:
    """An uninitialised, frozen parameter.

    dtype None: the model's compute dtype (the default dtype while the model is constructed),
    which the build casts to the engine dtype and the loader to the runtime's. A given dtype
    (int8, packed int32, float8, float32 scales) is the tensor's own: build, file and loader
    keep it bit-exact."""
    param = nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)
    param.feature_layout = layout
    param.fixed_dtype = dtype is not None
    return param


def has_fixed_dtype(param: torch.Tensor) -> bool:
    """True for a parameter made with its own dtype (see make_parameter)."""
    return getattr(param, "fixed_dtype", False)


class QuantMethod(abc.ABC):
    """One scheme's way of storing and multiplying by a linear layer's weight."""

    @abc.abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        """Register this method's parameters on `layer` (make_parameter, each with its
        layout) for this rank's share of the weight: output_size × input_size features."""

    @abc.abstractmethod
    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        """The tensors a checkpoint holds for one linear layer, besides its bias: ("weight",)
        for a full-precision checkpoint, ("weight", "weight_scale") for an FP8 one, ..."""

    def load_checkpoint_tensor(
        self,
        layer: nn.Module,
        name: str,
        loaded: torch.Tensor,
        placement: ShardPlacement,
        source_name: str,
    ) -> None:
        """Put this rank's slice of checkpoint tensor `name` (one of checkpoint_tensor_names;
        `source_name` is its full checkpoint name, for messages) where `placement` says.
        Default: into the layer's parameter of the same name, following its layout."""
        copy_into_place(getattr(layer, name), loaded, placement, source_name)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Runs once at build time after every checkpoint tensor is in (random weights too):
        quantise a full-precision weight, fuse per-part scales. Not run when an engine is
        loaded: the engine holds the result."""

    @abc.abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:  # (T, input_size) → (T, output_size)
        """x @ weight^T (+ bias), with this rank's share of the weight."""


class UnquantizedLinearMethod(QuantMethod):
    """A plain (out, in) weight in the model's compute dtype."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        layer.weight = make_parameter((output_size, input_size), WEIGHT_LAYOUT)

    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        return ("weight",)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return ops.linear(x, layer.weight, bias)

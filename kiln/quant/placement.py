"""Where this rank's slice of a checkpoint tensor goes, said once for every parameter kind.

A linear layer knows its tensor-parallel geometry (column or row split, fused q|k|v or
gate|up parts); a quantisation method knows what its parameters look like (packed ints,
group-wise scales, per-part scalars). They meet here: the layer describes the slice as a
`ShardPlacement` in feature units, each parameter carries a `FeatureLayout` saying which of
its dimensions run over output and input features and how many features one element
covers, and `copy_into_place` turns the two into one narrow-and-copy. A method therefore
never slices for tensor parallelism itself.

    checkpoint tensor (output features × input features, all ranks)
        rows [output_start, output_start + output_size), columns [input_start, + input_size)
            ──►  parameter rows [output_offset, output_offset + output_size), all columns

Along a dimension whose `block` is b (8 int4 values packed in an int32, a scale per group
of 128 inputs), every feature count and offset is divided by b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.errors import CheckpointError


@dataclass(frozen=True)
class FeatureLayout:
    """How one parameter's dimensions map onto its layer's output and input features."""

    # The dimension that runs over output features (None: the same on every output row).
    output_dim: int | None = 0
    # The dimension that runs over input features (None: the same on every input column).
    input_dim: int | None = 1
    # Features per element along output_dim / input_dim (pack factor or group size).
    output_block: int = 1
    input_block: int = 1
    # One entry per fused part (q, k, v or gate, up): e.g. an FP8 per-tensor weight scale of
    # a fused layer, shape (num_parts,), loaded from each part's scalar. Needs no dims above.
    per_part: bool = False


# A plain (out, in) weight and a per-output bias.
WEIGHT_LAYOUT = FeatureLayout()
BIAS_LAYOUT = FeatureLayout(output_dim=0, input_dim=None)


@dataclass(frozen=True)
class ShardPlacement:
    """This rank's slice of one checkpoint tensor of a linear layer, in feature units."""

    # Which fused part the tensor is (q/k/v, a gate|up index), None for an unfused layer,
    # and its position among the layer's parts (0 when unfused).
    part_id: int | str | None
    part_index: int
    # Output features: the checkpoint tensor has checkpoint_output_size of them (all ranks);
    # this rank takes [output_start, output_start + output_size) and puts them at
    # output_offset in the layer's (fused) outputs.
    checkpoint_output_size: int
    output_start: int
    output_size: int
    output_offset: int
    # Input features: [input_start, input_start + input_size) of checkpoint_input_size.
    checkpoint_input_size: int
    input_start: int
    input_size: int


def feature_layout(tensor: torch.Tensor) -> FeatureLayout:
    """The layout a parameter was created with (a plain (out, in) weight when none)."""
    return getattr(tensor, "feature_layout", WEIGHT_LAYOUT)


def _elements(features: int, block: int, what: str, source_name: str) -> int:
    if features % block:
        raise ValueError(
            f"{source_name}: {what} of {features} features does not split into blocks of "
            f"{block}; choose a tensor-parallel size (or group size) that divides it"
        )
    return features // block


def copy_into_place(
    destination: torch.Tensor,
    loaded: torch.Tensor,
    placement: ShardPlacement,
    source_name: str,
    layout: FeatureLayout | None = None,
) -> None:
    """Copy this rank's slice of the whole checkpoint tensor `loaded` into `destination` (a
    parameter, or a method's own full-precision buffer). Raises CheckpointError naming
    `source_name` when the checkpoint tensor has the wrong shape."""
    layout = layout or feature_layout(destination)
    if layout.per_part:
        if loaded.numel() != 1:
            raise CheckpointError(
                f"tensor {source_name!r} has shape {tuple(loaded.shape)}, expected one value"
            )
        destination.data[placement.part_index].copy_(loaded.reshape(()))
        return
    # The whole checkpoint tensor's shape: this rank's parameter, widened along the split dims.
    expected = list(destination.shape)
    output_dim, input_dim = layout.output_dim, layout.input_dim
    if output_dim is not None:
        block = layout.output_block
        expected[output_dim] = _elements(
            placement.checkpoint_output_size, block, "output", source_name
        )
    if input_dim is not None:
        block = layout.input_block
        expected[input_dim] = _elements(
            placement.checkpoint_input_size, block, "input", source_name
        )
    _check_shape(source_name, expected, loaded)
    source, target = loaded, destination.data
    if output_dim is not None:
        block = layout.output_block
        start = _elements(placement.output_start, block, "output slice start", source_name)
        size = _elements(placement.output_size, block, "output slice", source_name)
        offset = _elements(placement.output_offset, block, "output offset", source_name)
        source = source.narrow(output_dim, start, size)
        target = target.narrow(output_dim, offset, size)
    if input_dim is not None:
        block = layout.input_block
        start = _elements(placement.input_start, block, "input slice start", source_name)
        size = _elements(placement.input_size, block, "input slice", source_name)
        source = source.narrow(input_dim, start, size)
    target.copy_(source)


def _check_shape(source_name: str, expected: list[int], loaded: torch.Tensor) -> None:
    if tuple(expected) != tuple(loaded.shape):
        raise CheckpointError(
            f"tensor {source_name!r} has shape {tuple(loaded.shape)}, expected {tuple(expected)}"
        )

"""Build-time quantisation math (round-to-nearest), shared by the schemes, and the staging of a
full-precision weight between loading and `process_weights_after_loading`.

    fp8       w ≈ q · s          q E4M3 (max 448), s = amax(|w_row|) / 448 per output row
    int8-wo   w ≈ q · s          q int8 in [-127, 127], s = amax(|w_group|) / 127
    int4-wo   w ≈ (q − z) · s    q in [0, 15]; asymmetric: s = (max − min) / 15,
                                 z = round(−min / s); symmetric: s = amax / 8, z = 8

Scales are computed in float32 and stored in the contract's dtype (kiln/quant/*.py). The
functions take the weight on any device: the builder quantises on the GPU when there is one
(an 8B model's 8 G weights take minutes of CPU time otherwise). A weight row holding inf or
NaN makes its scale inf or NaN (amax, min and max carry both): the scale functions check the
scales they compute, one value a row or group, and raise NonFiniteWeightError, which the
builder turns into an error naming the checkpoint tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.quant.placement import WEIGHT_LAYOUT, ShardPlacement, copy_into_place

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# A row or group of zeros gets this scale instead of 0 (no division by zero; q stays 0).
_MIN_SCALE = 1e-12

# The attribute a quantised layer keeps its full-precision weight in between loading and
# process_weights_after_loading. While it is there, `apply` multiplies by it unquantised:
# calibration (kiln/quant/calibration.py) runs the model in that state.
FULL_PRECISION = "full_precision_weight"


class NonFiniteWeightError(ValueError):
    """A weight row (of the layer's (out, in) weight) holds inf or NaN."""

    def __init__(self, row: int) -> None:
        super().__init__(f"a weight has non-finite values (row {row}); kiln cannot quantise it")
        self.row = row


def _finite(scale: torch.Tensor) -> torch.Tensor:  # (out,) or (out, groups)
    """`scale`, or NonFiniteWeightError naming the first row with an inf or NaN scale."""
    bad = ~torch.isfinite(scale)
    if bad.any():  # one host sync per layer, at build
        raise NonFiniteWeightError(int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0]))
    return scale


def stage_full_precision_weight(
    layer: nn.Module, loaded: torch.Tensor, placement: ShardPlacement, source_name: str
) -> None:
    """Copy this rank's slice of a full-precision checkpoint weight into the layer's staging
    buffer ((output_size, input_size), made on first use in the loaded tensor's dtype, at least
    the build's compute dtype)."""
    staged = getattr(layer, FULL_PRECISION, None)
    if staged is None:
        dtype = loaded.dtype if loaded.is_floating_point() else torch.float32
        if dtype.itemsize < torch.get_default_dtype().itemsize:
            dtype = torch.get_default_dtype()
        staged = torch.zeros(layer.output_size, layer.input_size, dtype=dtype)
        setattr(layer, FULL_PRECISION, staged)
    copy_into_place(staged, loaded, placement, source_name, layout=WEIGHT_LAYOUT)


def take_full_precision_weight(layer: nn.Module) -> torch.Tensor | None:
    """The staged weight (removed from the layer), float32, on the GPU when there is one."""
    staged = getattr(layer, FULL_PRECISION, None)
    if staged is None:
        return None
    delattr(layer, FULL_PRECISION)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return staged.to(device=device, dtype=torch.float32)


def check_group_size(group_size: int, input_size: int, prefix: str) -> int:
    """The group size in input features (-1: the whole row). Raises ValueError naming the
    layer when it does not divide the layer's inputs."""
    if group_size == -1:
        return input_size
    if input_size % group_size:
        fitting = [size for size in (16, 32, 64, 128, 256) if input_size % size == 0]
        raise ValueError(
            f"group size {group_size} does not divide {prefix}'s {input_size} input features; "
            f"choose a group size that divides every layer's input size (this layer's: "
            f"{', '.join(map(str, fitting)) or 'none of 16-256; -1 for one per row'})"
        )
    return group_size


# The rounding rules, one each, shared by round-to-nearest here and GPTQ's column-by-column
# rounding (the schemes' round_columns): `scale` (and `zero`) broadcast against `values`.
def fp8_levels(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """values / scale in E4M3 (saturating at ±448)."""
    return (values / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def int8_levels(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(values / scale) in [−127, 127], float."""
    return torch.round(values / scale).clamp(-127, 127)


def int4_levels(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """round(values / scale + zero) in [0, 15], float."""
    return torch.round(values / scale + zero).clamp(0, 15)


def fp8_channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) float → float32 scales (out,): each row's amax maps onto E4M3's 448."""
    return _finite((weight.float().abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE))


def quantize_fp8_per_channel(
    weight: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float → (E4M3 (out, in), float32 scales (out,)); `scale` given: round onto
    that grid (GPTQ computes the grid first, kiln/quant/gptq.py)."""
    weight = weight.float()
    scale = fp8_channel_scales(weight) if scale is None else scale.float()
    return fp8_levels(weight, scale[:, None]), scale


def int8_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) float → float32 scales (out, in // group_size), each a float16 value (the
    stored scale is what divides): symmetric, amax / 127."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scale = (groups.abs().amax(dim=2) / 127.0).clamp(min=_MIN_SCALE)
    return _finite(scale.to(torch.float16).float().clamp(min=6e-8))


def quantize_int8(
    weight: torch.Tensor, group_size: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float → (int8 (out, in), float16 scales (out, in // group_size)), symmetric;
    `scale` given (int8_scales' form): round onto that grid."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scale = int8_scales(weight, group_size) if scale is None else scale.float()
    q = int8_levels(groups, scale[..., None]).to(torch.int8)
    return q.reshape(out_features, in_features), scale.to(torch.float16)


def int4_grid(
    weight: torch.Tensor, group_size: int, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float → float32 (scales, zero points), (out, in // group_size) each, float16
    values. Asymmetric (zero_point): the group's [min, max] (widened to hold 0) maps onto
    [0, 15]; symmetric: z = 8 and s = amax / 8 (q − 8 in [−8, 7])."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    if zero_point:
        low = groups.amin(dim=2).clamp(max=0.0)
        high = groups.amax(dim=2).clamp(min=0.0)
        scale = ((high - low) / 15.0).clamp(min=_MIN_SCALE)
        scale = scale.to(torch.float16).float().clamp(min=6e-8)
        zero = torch.round(-low / scale).clamp(0, 15)
    else:
        scale = (groups.abs().amax(dim=2) / 8.0).clamp(min=_MIN_SCALE)
        scale = scale.to(torch.float16).float().clamp(min=6e-8)
        zero = torch.full_like(scale, 8.0)
    return _finite(scale), zero


def quantize_int4(
    weight: torch.Tensor, group_size: int, zero_point: bool = True,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float → (packed uint8 (out, in // 2), float16 scales and zero points
    (out, in // group_size)); `grid` given (int4_grid's form): round onto it."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scale, zero = int4_grid(weight, group_size, zero_point) if grid is None else grid
    q = int4_levels(groups, scale[..., None], zero[..., None]).to(torch.uint8)
    q = q.reshape(out_features, in_features)
    return pack_int4(q), scale.to(torch.float16), zero.to(torch.float16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 → (out, in // 2) uint8: column 2j in the low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (out, in // 2) uint8 → (out, in) uint8 in 0..15."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)

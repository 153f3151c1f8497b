"""GGUF linears kept quantised (`kiln build x.gguf --quant keep`): llama.cpp's Q8_0, Q4_0 and
Q4_1 blocks converted to kiln's int8-wo / int4-wo layout, groups of 32, no re-quantising.

A block covers 32 consecutive input columns of one row (ggml's block layouts):

    Q8_0  34 bytes: d (float16), 32 × int8 q             w = q · d
    Q4_0  18 bytes: d (float16), 16 bytes of nibbles     w = (q − 8) · d
    Q4_1  20 bytes: d, m (float16), 16 bytes of nibbles  w = q · d + m = (q − (−m/d)) · d
    nibbles: byte j holds column j (low nibble) and column j + 16 (high nibble)

so Q8_0 → int8-wo, scale d; Q4_0 → int4-wo, scale d, zero 8; Q4_1 → int4-wo, scale d,
zero −m/d (fractional; float16 rounds it to 2⁻¹¹ relative, an error of at most 2⁻¹¹ · |m| in a
weight, below bfloat16's own resolution of m). A Q4_1 block with d = 0 holds one value m (all
q are 0): zero −1 and scale m give it back. A block whose −m/d lies past float16's range
(|m| > 65504 · |d|: its 16 levels span less than 2⁻¹¹ of m, so in bfloat16 it is one value)
is kept the same way, as its mean m + d · mean(q): float16 would make its zero inf, and every
output it touches NaN.

A block whose d (or Q4_1's m) is inf or NaN is corruption, refused when the tensor is read:
only those float16 arrays are checked (one value a block), never the weights. A negative d
is normal (llama.cpp's Q8_0 / Q4_0 keep the sign of the block's largest value in it).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from kiln.checkpoint.packing import pack_int4_rows
from kiln.errors import CheckpointError

BLOCK = 32
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)
KEEPABLE = {
    GGMLQuantizationType.Q8_0: ("int8-wo", 34),
    GGMLQuantizationType.Q4_0: ("int4-wo", 18),
    GGMLQuantizationType.Q4_1: ("int4-wo", 20),
}
# The tensor names each scheme's layer holds (the quantisation contract).
OUTPUT_NAMES = {"int8-wo": ("weight", "weight_scale"),
                "int4-wo": ("qweight", "weight_scale", "weight_zero")}


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:  # (rows, nb, bytes)
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> torch.Tensor:  # (rows, nb) float16
    return torch.from_numpy(blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0])


def _nibble_columns(packed: np.ndarray) -> torch.Tensor:  # (rows, nb, 16) → (rows, nb·32)
    low, high = packed & 0xF, packed >> 4
    return torch.from_numpy(np.concatenate([low, high], axis=-1).reshape(packed.shape[0], -1))


def _check_scales(where: str, *scales: torch.Tensor) -> None:  # each (rows, nb)
    """CheckpointError unless every block's scales are finite (`where` names the tensor)."""
    bad = ~torch.isfinite(scales[0])
    for scale in scales[1:]:
        bad |= ~torch.isfinite(scale)
    count = int(bad.sum())
    if count:
        first = int(bad.flatten().nonzero()[0])  # in file order: row · blocks a row + block
        raise CheckpointError(f"{where} has {count} blocks with non-finite scales "
                              f"(first: block {first}); the file is corrupt")


def convert(raw: np.ndarray, ggml_type: GGMLQuantizationType, rows: int,
            where: str) -> dict[str, torch.Tensor]:
    """One GGUF tensor's raw blocks → its contract tensors by name (rows in file order);
    `where` names the tensor in the error a block with a non-finite scale raises."""
    scheme, block_bytes = KEEPABLE[ggml_type]
    blocks = _blocks(raw, rows, block_bytes)
    d = _f16(blocks, 0)
    if ggml_type == GGMLQuantizationType.Q8_0:
        _check_scales(where, d)
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, -1))
        return {"weight": q, "weight_scale": d}
    q = _nibble_columns(blocks[..., 2 if ggml_type == GGMLQuantizationType.Q4_0 else 4 :])
    if ggml_type == GGMLQuantizationType.Q4_0:
        _check_scales(where, d)
        zero = torch.full_like(d, 8.0)
        scale = d
    else:
        m = _f16(blocks, 2).float()
        _check_scales(where, d, m)
        d32 = d.float()
        # One value a block: d = 0, or levels finer than float16 can place the zero for.
        flat = (d32 == 0) | (m.abs() > _FLOAT16_MAX * d32.abs())
        levels = q.view(rows, -1, BLOCK)
        mean = m + d32 * levels.float().mean(dim=-1)
        if bool(flat.any()):
            levels.masked_fill_(flat.unsqueeze(-1), 0)
        zero = torch.where(flat, -1.0, -m / torch.where(flat, 1.0, d32)).to(torch.float16)
        scale = torch.where(flat, mean, d32).to(torch.float16)
    return {"qweight": pack_int4_rows(q), "weight_scale": scale, "weight_zero": zero}

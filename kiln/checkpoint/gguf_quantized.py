"""GGUF linears kept quantised (`kiln build x.gguf --quant keep`): llama.cpp's Q8_0, Q6_K,
Q4_0, Q4_1 and Q4_K blocks converted to kiln's int8-wo / int4-wo layout, groups of 32 (16
with Q6_K), no re-quantising.

A block covers 32 consecutive input columns of one row (ggml's block layouts):

    Q8_0  34 bytes: d (float16), 32 × int8 q             w = q · d
    Q4_0  18 bytes: d (float16), 16 bytes of nibbles     w = (q − 8) · d
    Q4_1  20 bytes: d, m (float16), 16 bytes of nibbles  w = q · d + m = (q − (−m/d)) · d
    nibbles: byte j holds column j (low nibble) and column j + 16 (high nibble)

The K-quants' super-blocks cover 256 columns, as 8 sub-blocks of 32 (Q4_K) or 16 of 16 (Q6_K):

    Q6_K  210 bytes: 128 bytes of low 4 bits, 64 of high 2 bits; 16 × int8 sc; d (float16)
          w = (q − 32) · (d · sc[j]) in sub-block j of 16: int8-wo's form, groups of 16

    Q4_K  144 bytes: d, dmin (float16); 12 bytes of 6-bit sc[8], m[8]; 128 bytes of nibbles
          w = q · (d · sc[j]) − dmin · m[j] in sub-block j: Q4_1's form, step d · sc[j] and
          offset −dmin · m[j]; the nibbles come in 4 runs of 32 bytes, run r's low nibbles
          sub-block 2r, its high nibbles sub-block 2r + 1

so Q8_0 → int8-wo, scale d (each block's d twice when the engine's groups are Q6_K's 16);
Q6_K → int8-wo, q − 32 and scale d · sc; Q4_0 → int4-wo, scale d, zero 8; Q4_1 (and each Q4_K sub-block)
→ int4-wo, scale d, zero −m/d (fractional; float16 rounds it to 2⁻¹¹ relative, an error of at most 2⁻¹¹ · |m| in a
weight, below bfloat16's own resolution of m). A Q4_1 block with d = 0 holds one value m (all
q are 0): zero −1 and scale m give it back. A block whose −m/d lies past float16's range
(|m| > 65504 · |d|: its 16 levels span less than 2⁻¹¹ of m, so in bfloat16 it is one value)
is kept the same way, as its mean m + d · mean(q): float16 would make its zero inf, and every
output it touches NaN.

A block whose d (or Q4_1's m, Q4_K's dmin) is inf or NaN is corruption, refused when the
tensor is read (and so is a Q4_K sub-block step d · sc past float16's range):
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
    GGMLQuantizationType.Q4_K: ("int4-wo", 144),
    GGMLQuantizationType.Q6_K: ("int8-wo", 210),
}
# int8-wo's groups: Q8_0's blocks of 32, or Q6_K's sub-blocks of 16 (Q8_0 split to match).
Q6_K_GROUP = 16
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


def _float16_scales(where: str, scale: torch.Tensor) -> torch.Tensor:  # (rows, groups)
    """`scale` (float32 products such as d · sc) in the float16 kiln stores, or
    CheckpointError where one lies past float16's range (only a corrupt file has it)."""
    converted = scale.to(torch.float16)
    bad = ~torch.isfinite(converted)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        raise CheckpointError(f"{where} has a group whose scale lies past float16's range "
                              f"(first: group {first}); the file is corrupt")
    return converted


def convert(raw: np.ndarray, ggml_type: GGMLQuantizationType, rows: int,
            where: str, int8_group: int = BLOCK) -> dict[str, torch.Tensor]:
    """One GGUF tensor's raw blocks → its contract tensors by name (rows in file order);
    `where` names the tensor in the error a block with a non-finite scale raises;
    `int8_group`: the engine's int8-wo group size (32, or 16 when it keeps Q6_K)."""
    scheme, block_bytes = KEEPABLE[ggml_type]
    blocks = _blocks(raw, rows, block_bytes)
    if ggml_type == GGMLQuantizationType.Q6_K:
        return _q6_k(blocks, rows, where)
    d = _f16(blocks, 0)
    if ggml_type == GGMLQuantizationType.Q8_0:
        _check_scales(where, d)
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, -1))
        return {"weight": q, "weight_scale": d.repeat_interleave(BLOCK // int8_group, dim=1)}
    if ggml_type == GGMLQuantizationType.Q4_K:
        return _q4_k(blocks, rows, where)
    q = _nibble_columns(blocks[..., 2 if ggml_type == GGMLQuantizationType.Q4_0 else 4 :])
    if ggml_type == GGMLQuantizationType.Q4_0:
        _check_scales(where, d)
        zero = torch.full_like(d, 8.0)
        return {"qweight": pack_int4_rows(q), "weight_scale": d, "weight_zero": zero}
    m = _f16(blocks, 2).float()
    _check_scales(where, d, m)
    return _affine_int4(q, d.float(), m, rows, where)


def _affine_int4(q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, rows: int,
                 where: str) -> dict[str, torch.Tensor]:
    """Groups of 32 levels q (rows, groups · 32) meaning w = q · step + offset (float32,
    (rows, groups)) as int4-wo's scale step and zero −offset / step."""
    _float16_scales(where, step)
    # One value a group: step 0, or levels finer than float16 can place the zero for.
    flat = (step == 0) | (offset.abs() > _FLOAT16_MAX * step.abs())
    levels = q.view(rows, -1, BLOCK)
    mean = offset + step * levels.float().mean(dim=-1)
    if bool(flat.any()):
        levels.masked_fill_(flat.unsqueeze(-1), 0)
    zero = torch.where(flat, -1.0, -offset / torch.where(flat, 1.0, step)).to(torch.float16)
    scale = torch.where(flat, mean, step).to(torch.float16)
    return {"qweight": pack_int4_rows(q), "weight_scale": scale, "weight_zero": zero}


def _q6_k(blocks: np.ndarray, rows: int, where: str) -> dict[str, torch.Tensor]:
    """Q6_K super-blocks (rows, nb, 210) → int8-wo in groups of 16 (ggml's
    dequantize_row_q6_K): each half of 128 columns takes 64 bytes of low nibbles (a, then b)
    and 32 of high 2-bit pairs, columns l, l + 32, l + 64, l + 96 from a's low nibble, b's
    low, a's high, b's high."""
    d = _f16(blocks, 208)
    _check_scales(where, d)
    low = blocks[..., :128].reshape(rows, -1, 2, 64)
    high = blocks[..., 128:192].reshape(rows, -1, 2, 32)
    a, b = low[..., :32], low[..., 32:]
    parts = [(a & 0xF) | ((high & 3) << 4), (b & 0xF) | (((high >> 2) & 3) << 4),
             (a >> 4) | (((high >> 4) & 3) << 4), (b >> 4) | (((high >> 6) & 3) << 4)]
    levels = np.stack(parts, axis=-2).astype(np.int8) - 32  # (rows, nb, 2, 4, 32), 0..63
    q = torch.from_numpy(levels.reshape(rows, -1))
    sc = torch.from_numpy(blocks[..., 192:208].copy().view(np.int8)).float()  # (rows, nb, 16)
    scale = _float16_scales(where, (d.float()[..., None] * sc).reshape(rows, -1))
    return {"weight": q, "weight_scale": scale}


def _q4_k(blocks: np.ndarray, rows: int, where: str) -> dict[str, torch.Tensor]:
    """Q4_K super-blocks (rows, nb, 144) → int4-wo in groups of 32 (ggml's
    dequantize_row_q4_K, get_scale_min_k4)."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    _check_scales(where, d, dmin)
    packed = blocks[..., 4:16].astype(np.int32)  # (rows, nb, 12)
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 63, (high & 0xF) | ((low >> 6) << 4)], axis=-1)  # (rows, nb, 8)
    mn = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=-1)
    nibbles = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)  # 4 runs of 32 bytes
    levels = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=3)  # (rows, nb, 4, 2, 32)
    q = torch.from_numpy(levels.reshape(rows, -1))
    step = d.float()[..., None] * torch.from_numpy(sc).float()  # (rows, nb, 8)
    offset = -dmin.float()[..., None] * torch.from_numpy(mn).float()
    return _affine_int4(q, step.reshape(rows, -1), offset.reshape(rows, -1), rows, where)

"""Bit unpacking of the quantised checkpoint formats, and packing into kiln's int4 layout.

kiln's int4 layout (the quantisation contract): `qweight` uint8 (out, in / 2), the low
nibble is input column 2j, the high nibble column 2j + 1; `weight_scale` and `weight_zero`
float16 (out, in / G), zero points in units of q; w = (q − z) · s.

The formats, as their writers publish them (all int32 words, little-endian nibbles):

    AWQ (GEMM)   qweight (in, out/8): word c holds output columns 8c..8c+7, nibble i
                 (bits 4i..4i+3) holding column 8c + AWQ_ORDER[i], AWQ_ORDER = [0,2,4,6,1,3,5,7];
                 qzeros (in/G, out/8) the same way; scales (in/G, out). w = (q − z) · s.
    GPTQ         qweight (in/8, out): word r holds input rows 8r..8r+7, nibble i = row 8r + i;
                 qzeros (in/G, out/8) packed along the output, nibble i = column 8c + i;
                 scales (in/G, out). Format v1 ("gptq", AutoGPTQ) stores z − 1 (so z = 0 is
                 stored as 15 and wraps back); v2 ("gptq_v2") stores z. w = (q − z) · s.
    compressed-tensors pack-quantized
                 weight_packed (out, ⌈in·b/32⌉): element i of a row at bits i·b (dense), the
                 signed value + 2^(b−1); weight_zero_point packed the same way along dim 0.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words → their 8 nibbles (0..15, int16) in order i = 0..7 along `dim` (the
    packed dimension grows 8×): nibble i of a word is bits 4i..4i+3."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,)
    words = packed.to(torch.int32).unsqueeze(-1)  # (..., 8)
    nibbles = ((words >> shifts) & 0xF).to(torch.int16)  # (..., 8): arithmetic shift, masked
    if dim in (-1, packed.dim() - 1):
        return nibbles.flatten(-2)
    # Packed along dim 0 of a 2-D tensor: (R, C, 8) → (R, 8, C) → (8R, C).
    return nibbles.permute(0, 2, 1).reshape(packed.shape[0] * 8, packed.shape[1])


def unpack_int32_bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 words → their 4 bytes (0..255, int16) along the last dim, byte i = bits 8i.."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int32)
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xFF).to(torch.int16).flatten(-2)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ qweight/qzeros (rows, out/8) → (rows, out) values 0..15 in column order."""
    nibbles = unpack_int32_nibbles(packed, dim=-1).unflatten(-1, (-1, 8))  # (rows, out/8, 8)
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles  # nibble i is column AWQ_ORDER[i]
    return columns.flatten(-2)


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """(out, in) integers 0..15 → kiln's qweight (out, in/2) uint8, column 2j low."""
    values = values.to(torch.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """kiln's qweight (out, in/2) → (out, in) values 0..15 (uint8); the inverse of pack."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).flatten(-2)


def dequantize_int4(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:  # (out, in) float32
    """w = (q − z) · s with group-broadcast scales and zero points: the contract's meaning."""
    q = unpack_int4_rows(qweight).float()
    group = q.shape[1] // scale.shape[1]
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.float().repeat_interleave(group, dim=1)
    return (q - z) * s

"""Rotary position embedding (NeoX / Hugging Face "rotate_half" layout): torch reference."""

from __future__ import annotations

import torch


def rope_reference(
    positions: torch.Tensor,  # (T,) int64
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim) float32: [cos | sin] halves
) -> tuple[torch.Tensor, torch.Tensor]:
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # (T, rotary_dim/2) each
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)  # (T, 1, rotary_dim)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
        half = rotary_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated_half * sin
        return torch.cat([out.to(x.dtype), rest], dim=-1)

    return rotate(query), rotate(key)

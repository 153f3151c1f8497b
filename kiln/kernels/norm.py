"""RMSNorm (with an optional fused residual add) and LayerNorm: torch references."""

from __future__ import annotations

import torch


def rms_norm_reference(
    x: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (T, H)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (normed, new_residual). With a residual, normalises x + residual and returns
    that sum as the new residual, so the decoder layer never materialises it twice."""
    if residual is not None:
        x = x + residual
        residual = x
    # Normalise in float32, then cast back before the weight, as Hugging Face Llama does.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), residual


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)

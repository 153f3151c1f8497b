"""RMSNorm (with an optional fused residual add) and LayerNorm: torch references, and a Triton
RMSNorm that normalises each row of the last axis in one program."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_utils import (
    pdl_prologue,
    use_pdl,
    check_float,
    check_last_dim_contiguous,
    launchable,
    next_power_of_2,
)


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


@triton.jit
def _rms_norm_kernel(
    x_ptr, stride_x_outer, stride_x_inner,  # rows of (outer, inner, H): (T, 1, H) or (T, heads, D)
    residual_ptr, stride_r_outer, stride_r_inner,  # same shape as x, when HAS_RESIDUAL
    weight_ptr,  # (H,)
    out_ptr,  # (outer * inner, H) contiguous
    residual_out_ptr,  # (outer * inner, H) contiguous: x + residual, when HAS_RESIDUAL
    inner, eps,
    H: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    outer_index = row // inner
    inner_index = row % inner
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x_row = x_ptr + outer_index * stride_x_outer + inner_index * stride_x_inner
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual_row = residual_ptr + outer_index * stride_r_outer + inner_index * stride_r_inner
        residual = tl.load(residual_row + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to x's dtype before it is normalised, as the reference's
        # `x + residual` is.
        summed = (x + residual).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * H + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, 0) / H
    # Same rounding order as the reference: normalise in fp32, cast to x's dtype, then weight.
    normed = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def check_rms_norm_inputs(name: str, x: torch.Tensor, weight: torch.Tensor,
                          residual: torch.Tensor | None, shapes: tuple[tuple[int, str], ...]) -> None:
    """The checks every RMSNorm launcher makes; shapes: the (rank, description) x may have."""
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() not in [rank for rank, _ in shapes]:
        raise ValueError(f"{name} takes {' or '.join(text for _, text in shapes)}; got shape "
                         f"{tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)


def rms_norm(
    x: torch.Tensor,  # (T, H) or (T, heads, D) (Qwen3's per-head q/k norm)
    weight: torch.Tensor,  # (H,) or (D,)
    eps: float,
    residual: torch.Tensor | None = None,  # same shape and dtype as x
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `rms_norm_reference`: (normed, x + residual or None), new tensors."""
    check_rms_norm_inputs("rms_norm", x, weight, residual, ((2, "(T, H)"), (3, "(T, heads, D)")))
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # (outer, inner, H)
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = None
    r3 = x3  # unread without a residual
    if residual is not None:
        check_last_dim_contiguous("residual", residual)
        r3 = residual if residual.dim() == 3 else residual.unsqueeze(1)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = x3.shape[0] * x3.shape[1]
    if num_rows == 0:
        return out, new_residual
    block = next_power_of_2(hidden)
    pdl = use_pdl(x)
    launchable(_rms_norm_kernel, x)[(num_rows,)](
        x3, x3.stride(0), x3.stride(1),
        r3, r3.stride(0), r3.stride(1),
        weight, out, new_residual if new_residual is not None else out,
        x3.shape[1], eps,
        H=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        # One row per program; enough warps that each thread moves a few 16-byte vectors.
        num_warps=max(1, min(8, block // 512)),
        USE_PDL=pdl, launch_pdl=pdl,
    )
    return out, new_residual

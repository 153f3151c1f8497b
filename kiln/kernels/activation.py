"""Gated and plain activations: torch references, and a Triton fused SiLU-and-mul."""

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


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last axis (T, 2I) → silu(gate) * up (T, I)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": the tanh approximation."""
    return torch.nn.functional.gelu(x, approximate="tanh")


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, stride_xt,  # (T, 2I): [gate | up]
    out_ptr,  # (T, I) contiguous
    intermediate,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    row = x_ptr + token * stride_xt
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    # Rounded to the input dtype before the product, as the reference's silu(gate) * up is.
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + token * intermediate + cols, (silu * up).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # (..., 2I) → (..., I)
    """Triton twin of `silu_and_mul_reference`."""
    check_float("x", x)
    check_last_dim_contiguous("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last axis ([gate | up]); got {x.shape[-1]}")
    intermediate = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])  # (T, 2I); a view for the usual contiguous input
    out = torch.empty(*x.shape[:-1], intermediate, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0 or intermediate == 0:
        return out
    block = min(1024, next_power_of_2(intermediate))
    grid = (x2.shape[0], triton.cdiv(intermediate, block))
    pdl = use_pdl(x)
    launchable(_silu_and_mul_kernel, x)[grid](
        x2, x2.stride(0), out, intermediate, BLOCK=block, num_warps=4 if block >= 1024 else 1,
        USE_PDL=pdl, launch_pdl=pdl,
    )
    return out

"""Gated and plain activations: torch references."""

from __future__ import annotations

import torch


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last axis (T, 2I) → silu(gate) * up (T, I)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": the tanh approximation."""
    return torch.nn.functional.gelu(x, approximate="tanh")

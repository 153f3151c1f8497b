"""The one dispatcher for every op: the model code calls these, never an implementation.

Today every op runs its torch reference (CPU and GPU alike). Fast paths (Triton, cuBLAS)
plug in here, selected per op when the tensors are on CUDA and `KILN_REFERENCE_KERNELS` is
not set; the reference stays the oracle that tests and `kiln verify` compare against.
"""

from __future__ import annotations

import torch

from kiln.kernels.activation import gelu_tanh_reference, silu_and_mul_reference
from kiln.kernels.attention import paged_attention_reference, write_kv_cache_reference
from kiln.kernels.norm import layer_norm_reference, rms_norm_reference
from kiln.kernels.rope import rope_reference


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


rms_norm = rms_norm_reference
layer_norm = layer_norm_reference
rope = rope_reference
silu_and_mul = silu_and_mul_reference
gelu_tanh = gelu_tanh_reference
write_kv_cache = write_kv_cache_reference
paged_attention = paged_attention_reference

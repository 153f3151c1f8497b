"""Allocation of the per-layer paged KV tensors (layout: see kiln/kernels/attention.py).

The shape comes from the loaded model, not the config: with tensor parallelism a rank holds
only its KV heads (`KVCacheSpec.of_model` reads every attention layer).

The tensors are allocated uninitialised: a GPU's 50+ GB of KV cache is never memset at start.
That is safe because attention reads only positions below a sequence's length, and every such
position was written (this step or an earlier one) before it is read; masked loads never see
the rest. The one exception is the reserved null block 0: padding rows of a CUDA-graph batch
attend over its first slot, so it is zeroed to keep their (discarded) outputs finite.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from kiln.layers.attention import Attention

NULL_BLOCK = 0


@dataclass(frozen=True)
class KVCacheSpec:
    """One rank's paged KV cache: a (2, blocks, block_size, num_kv_heads, head_dim) tensor
    per attention layer, in `dtype` (EngineConfig.kv_cache_dtype)."""

    num_layers: int
    num_kv_heads: int  # this rank's
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of_model(cls, model: torch.nn.Module, dtype: torch.dtype) -> "KVCacheSpec":
        layers = [module for module in model.modules() if isinstance(module, Attention)]
        shapes = {(layer.num_kv_heads, layer.head_dim) for layer in layers}
        if len(shapes) != 1:
            raise ValueError(f"attention layers disagree on (KV heads, head dim): {sorted(shapes)}")
        (num_kv_heads, head_dim), = shapes
        return cls(len(layers), num_kv_heads, head_dim, dtype)

    def bytes_per_block(self, block_size: int) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    caches = []
    for _ in range(spec.num_layers):
        cache = torch.empty(shape, dtype=spec.dtype, device=device)  # (2, blocks, bs, Hkv, D)
        cache[:, NULL_BLOCK].zero_()
        caches.append(cache)
    return caches


FP8_KV_DTYPE = torch.float8_e4m3fn


def kv_cache_torch_dtype(name: str, compute_dtype: torch.dtype, build: dict) -> torch.dtype:
    """EngineConfig.kv_cache_dtype → the cache tensors' dtype. "auto": the engine's build
    choice (`kiln build --kv-cache-dtype fp8`), else the compute dtype; "fp8": E4M3."""
    if name == "auto":
        name = "fp8" if build.get("kv_cache_dtype") == "fp8" else "auto"
    if name == "fp8":
        return FP8_KV_DTYPE
    return compute_dtype if name == "auto" else getattr(torch, name)


def kv_scales_of(model: torch.nn.Module, calibrated: bool) -> dict:
    """The attention layers' KV scales, for the manifest's build section."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return {
        "k": [float(layer.k_scale) for layer in layers],
        "v": [float(layer.v_scale) for layer in layers],
        "calibrated": calibrated,
    }


def apply_kv_scales(model: torch.nn.Module, build: dict, dtype: torch.dtype) -> None:
    """Give each attention layer the KV scales its engine recorded. An FP8 cache without
    calibrated scales runs with 1.0 (E4M3 then holds |k|, |v| up to 448, and loses precision
    on small values): warned about once."""
    if dtype != FP8_KV_DTYPE:
        return
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    scales = build.get("kv_scales") or {}
    k, v = scales.get("k"), scales.get("v")
    if isinstance(k, list) and isinstance(v, list) and len(k) == len(v) == len(layers):
        for layer, k_scale, v_scale in zip(layers, k, v):
            layer.k_scale.fill_(float(k_scale))
            layer.v_scale.fill_(float(v_scale))
    if not scales.get("calibrated"):
        warnings.warn("FP8 KV cache with uncalibrated scales (1.0): build with --calibration "
                      "to measure them", stacklevel=2)

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

from kiln.config import DEFAULT_BLOCK_SIZE, FP8_KV_DEFAULT_BLOCK_SIZE
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


def default_block_size(kv_cache_dtype: torch.dtype) -> int:
    """Tokens per cache block when the user sets none: an FP8 cache's own default
    (config.FP8_KV_DEFAULT_BLOCK_SIZE: its decode reads each block's V as one run), else
    config.DEFAULT_BLOCK_SIZE."""
    if kv_cache_dtype == FP8_KV_DTYPE:
        return FP8_KV_DEFAULT_BLOCK_SIZE
    return DEFAULT_BLOCK_SIZE


def kv_cache_torch_dtype(name: str, compute_dtype: torch.dtype, build: dict) -> torch.dtype:
    """EngineConfig.kv_cache_dtype → the cache tensors' dtype. "auto": the engine's build
    choice (`kiln build --kv-cache-dtype fp8`), else the compute dtype; "fp8": E4M3."""
    if name == "auto":
        name = "fp8" if build.get("kv_cache_dtype") == "fp8" else "auto"
    if name == "fp8":
        return FP8_KV_DTYPE
    return compute_dtype if name == "auto" else getattr(torch, name)


def kv_scales_of(model: torch.nn.Module, calibrated: bool) -> dict:
    """The attention layers' KV scales, for the manifest's build section; calibrated, also
    the key offsets ([layer][KV head][channel], the keys' mean an FP8 cache subtracts)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    scales = {
        "k": [float(layer.k_scale) for layer in layers],
        "v": [float(layer.v_scale) for layer in layers],
        "calibrated": calibrated,
    }
    if calibrated:
        scales["k_offset"] = [layer.k_offset.tolist() for layer in layers]
    return scales


def stored_kv_scales(pairs) -> dict:
    """The manifest's kv_scales from a checkpoint's own (k_scale, v_scale) per layer (a
    prequantised checkpoint declaring an FP8 KV cache): not calibrated by kiln, so no key
    offsets, but measured by whoever quantised it, so no warning either."""
    return {"k": [k for k, _ in pairs], "v": [v for _, v in pairs], "calibrated": False,
            "source": "checkpoint"}


def apply_kv_scales(model: torch.nn.Module, build: dict, dtype: torch.dtype,
                    parallel=None) -> None:
    """Give each attention layer the KV scales (and key offsets) its engine recorded: a
    pipeline stage its own layers', a tensor-parallel rank its own KV heads' offsets
    (`parallel`: the rank's ParallelState; None = one process). An FP8 cache without
    calibrated scales runs with 1.0 and no offsets (E4M3 then holds |k|, |v| up to 448, and
    loses precision on small values): warned about once. Scales a prequantised checkpoint
    stored (stored_kv_scales) are used as they are."""
    if dtype != FP8_KV_DTYPE:
        return
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    scales = build.get("kv_scales") or {}
    k, v = scales.get("k"), scales.get("v")
    if isinstance(k, list) and isinstance(v, list):
        # The lists cover the whole model; a pipeline stage holds a range of its layers.
        own = parallel.stage_layers(len(k)) if parallel is not None else range(len(k))
        if len(k) != len(v) or len(own) != len(layers):
            raise ValueError(f"the manifest's kv_scales hold {len(k)} k and {len(v)} v scales; "
                             f"this model's layers {own.start}..{own.start + len(layers) - 1} "
                             "need them")
        for layer, k_scale, v_scale in zip(layers, k[own.start : own.stop], v[own.start : own.stop]):
            layer.k_scale.fill_(float(k_scale))
            layer.v_scale.fill_(float(v_scale))
        offsets = scales.get("k_offset")
        if offsets is not None:
            tp_rank, tp_size = (parallel.tp_rank, parallel.tp_size) if parallel else (0, 1)
            all_offsets = _key_offsets(offsets, len(k), layers, tp_rank, tp_size)
            for layer, offset in zip(layers, all_offsets[own.start : own.stop]):
                layer.k_offset.copy_(offset)
    if not scales.get("calibrated") and scales.get("source") != "checkpoint":
        warnings.warn("FP8 KV cache with uncalibrated scales (1.0): build with --calibration "
                      "to measure them", stacklevel=2)


def _key_offsets(recorded, num_layers: int, layers: list[Attention], tp_rank: int,
                 tp_size: int):
    """The manifest's k_offset ([layer][KV head][channel], every KV head) as this rank's
    (Hkv, D) tensors: ranks split the KV heads, or share one when there are fewer heads than
    ranks (QKVParallelLinear's placement). A shape that fits no layer is an error naming
    the field: silently wrong offsets would shift every cached key."""
    try:
        offsets = torch.tensor(recorded, dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the manifest's kv_scales.k_offset is not a [layer][KV head][channel] "
                         f"array of numbers: {error}") from None
    local, head_dim = layers[0].num_kv_heads, layers[0].head_dim
    if (offsets.dim() != 3 or offsets.shape[0] != num_layers or offsets.shape[2] != head_dim
            or max(1, offsets.shape[1] // tp_size) != local):
        raise ValueError(f"the manifest's kv_scales.k_offset has shape {tuple(offsets.shape)}; "
                         f"this model needs ({num_layers} layers, KV heads, {head_dim}) with "
                         f"{local} KV heads on each of {tp_size} ranks")
    replicas = max(1, tp_size // offsets.shape[1])  # ranks holding the same KV heads
    first = (tp_rank // replicas) * local
    return offsets[:, first : first + local]

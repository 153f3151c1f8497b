"""What every model declaration shares: loading checkpoint tensors into (fused) parameters,
the forward signature, and the helpers that read a Hugging Face config.

A model declares, as class attributes:
  packed_modules_mapping   fused parameter → [(checkpoint module, shard id), ...]
  ignored_checkpoint_suffixes   checkpoint tensors that are derived, not learned
and implements `config_from_hf`, `forward` and `compute_logits`.
"""

from __future__ import annotations

import abc
from typing import Iterable

import torch
from torch import nn

from kiln.errors import CheckpointError
from kiln.layers.linear import default_weight_loader
from kiln.models.config import ModelConfig


class CausalLM(nn.Module, abc.ABC):
    packed_modules_mapping: dict[str, list[tuple[str, int | str]]] = {}
    ignored_checkpoint_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    @abc.abstractmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        """Normalise this architecture's Hugging Face config.json."""

    @property
    @abc.abstractmethod
    def backbone(self) -> nn.Module:
        """The decoder stack under its Hugging Face name (`model`, `transformer`, ...)."""

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) all scheduled tokens, flat
        positions: torch.Tensor,  # (T,)
        kv_caches: list[torch.Tensor],  # one (2, num_blocks, block_size, Hkv, D) per layer
        metadata,  # AttentionMetadata
    ) -> torch.Tensor:  # (T, hidden) final hidden states
        """Run one flat ragged batch; writes this step's KV into kv_caches."""
        return self.backbone(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, H) → (N, V) float32
        return self.lm_head(hidden)

    def compute_logits_into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(N, H) → (N, V) logits in the model dtype, written into `out` (CUDA graphs)."""
        return self.lm_head.logits_into(hidden, out)

    # ---- checkpoint loading -------------------------------------------------------------

    def map_checkpoint_name(self, name: str) -> str | None:
        """Checkpoint name → this model's naming (None: ignore the tensor)."""
        return None if name.endswith(self.ignored_checkpoint_suffixes) else name

    def transform_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Hook for layout changes (GPT-2's Conv1D stores weights transposed)."""
        return tensor

    def expected_checkpoint_names(self) -> set[str]:
        """Every tensor name (this model's naming, before fusion) the checkpoint must hold."""
        names = set()
        for param_name, _ in self.named_parameters():
            for fused, shards in self.packed_modules_mapping.items():
                if f".{fused}." in param_name:
                    names.update(param_name.replace(fused, source) for source, _ in shards)
                    break
            else:
                names.add(param_name)
        return names

    def load_checkpoint_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into this model's parameters, fusing as declared.
        Raises CheckpointError naming any unexpected, mis-shaped or missing tensor."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for checkpoint_name, tensor in tensors:
            name = self.map_checkpoint_name(checkpoint_name)
            if name is None:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied: the embedding is the head
            tensor = self.transform_checkpoint_tensor(name, tensor)
            for fused, shards in self.packed_modules_mapping.items():
                shard = next((s for s in shards if f".{s[0]}." in name), None)
                if shard is not None:
                    target = params.get(name.replace(shard[0], fused))
                    if target is not None:
                        target.weight_loader(target, tensor, checkpoint_name, shard[1])
                    break
            else:
                target = params.get(name)
                if target is not None:
                    loader = getattr(target, "weight_loader", default_weight_loader)
                    loader(target, tensor, checkpoint_name)
            if target is None:
                raise CheckpointError(
                    f"checkpoint tensor {checkpoint_name!r} does not belong to "
                    f"{self.config.architecture} with this config"
                )
            loaded.add(name)
        missing = sorted(self.expected_checkpoint_names() - loaded)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")

    def engine_state_dict(self) -> dict[str, torch.Tensor]:
        """The fused parameters as stored in an engine file (tied weights stored once)."""
        return {name: p.detach() for name, p in self.named_parameters()}


# ---- reading Hugging Face configs ---------------------------------------------------------


def hf_get(hf: dict, key: str, *, default=..., source: str = "config.json"):
    """A required (no default) or optional key of an HF config, with a clear error."""
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise CheckpointError(f"{source} has no {key!r}, which {hf.get('architectures')} needs")
    return default


def hf_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either the old (rope_theta + rope_scaling) or the new
    (rope_parameters) Hugging Face spelling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    merged.pop("rope_theta", None)
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **merged}


def hf_eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)

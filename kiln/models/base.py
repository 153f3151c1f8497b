"""What every model declaration shares: loading checkpoint tensors into (fused, sharded,
quantised) parameters, the forward signature, and the helpers that read a Hugging Face config.

A model declares, as class attributes:
  packed_modules_mapping   fused layer → [(checkpoint module, part id), ...]
  ignored_checkpoint_suffixes   checkpoint tensors that are derived, not learned
and implements `config_from_hf`, `backbone` and its layers. It is constructed as
`Model(config, quant_config=..., parallel=...)` and hands both, with each layer's name
(`prefix`), to every layer that slices or quantises: the model file itself never does.
"""

from __future__ import annotations

import abc
from typing import Iterable

import torch
from torch import nn

from kiln.errors import CheckpointError, KilnError
from kiln.layers.loading import CheckpointLoadable, default_weight_loader
from kiln.models.config import ModelConfig
from kiln.layers.embedding import ParallelLMHead, QuantizedLMHead
from kiln.parallel.pipeline import OtherStage, is_on_other_stage
from kiln.parallel.state import SINGLE_PROCESS, ParallelState
from kiln.quant.base import UnquantizedLinearMethod, has_fixed_dtype
from kiln.quant.config import NO_QUANTIZATION, QuantConfig
from kiln.quant.quantize import NonFiniteWeightError


class CausalLM(nn.Module, abc.ABC):
    packed_modules_mapping: dict[str, list[tuple[str, int | str]]] = {}
    ignored_checkpoint_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(
        self,
        config: ModelConfig,
        *,
        quant_config: QuantConfig | None = None,
        parallel: ParallelState | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config or NO_QUANTIZATION
        self.parallel = parallel or SINGLE_PROCESS

    # The token embedding's module name (a tied LM head reads its weight).
    embedding_name: str = ""

    def make_lm_head(self, embedding: nn.Module) -> nn.Module:
        """The LM head of the last pipeline stage (OtherStage elsewhere). Tied to `embedding`
        when both live on this stage; a last stage without the embedding (pp > 1) holds its
        own copy of the tied matrix, loaded from the embedding's checkpoint tensor."""
        if not self.parallel.is_last_stage:
            return OtherStage()
        if not isinstance(self.quant_config.linear_method("lm_head"), UnquantizedLinearMethod):
            # --quant-lm-head: a quantised copy of the matrix, also when tied (the embedding
            # keeps the compute dtype: a lookup reads one row, the head reads them all).
            return QuantizedLMHead(
                self.config.vocab_size, self.config.hidden_size,
                quant_config=self.quant_config, parallel=self.parallel, prefix="lm_head",
            )
        tied = self.config.tie_word_embeddings and self.parallel.is_first_stage
        return ParallelLMHead(
            self.config.vocab_size, self.config.hidden_size,
            tied_to=embedding if tied else None, parallel=self.parallel, prefix="lm_head",
        )

    def _holds_tied_head_copy(self) -> bool:
        return (self.config.tie_word_embeddings
                and isinstance(self.lm_head, (ParallelLMHead, QuantizedLMHead))
                and self.lm_head.tied_to is None)

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

    def split_checkpoint_tensor(
        self, name: str, tensor: torch.Tensor
    ) -> list[tuple[int | str | None, torch.Tensor]] | None:
        """Hook for a checkpoint tensor that already holds several parts of a fused layer
        (GPT-2's c_attn is q|k|v): its (part id, part) pairs, so each rank takes its heads
        of every part. None: the tensor is one part (or unfused)."""
        return None

    def _fused_name(self, name: str) -> tuple[str, int | str | None]:
        """A checkpoint tensor name (this model's naming) → (the fused layer's tensor name,
        the part it is), e.g. ...self_attn.k_proj.weight → (...self_attn.qkv_proj.weight, "k")."""
        for fused, parts in self.packed_modules_mapping.items():
            for source, part_id in parts:
                if f".{source}." in name:
                    return name.replace(source, fused), part_id
        return name, None

    def _unfused_names(self, name: str) -> list[str]:
        """The inverse of _fused_name: the checkpoint names one fused tensor is loaded from."""
        for fused, parts in self.packed_modules_mapping.items():
            if f".{fused}." in name:
                return [name.replace(fused, source) for source, _ in parts]
        return [name]

    def expected_checkpoint_names(self) -> set[str]:
        """Every tensor name (this model's naming, before fusion) the checkpoint must hold."""
        names: set[str] = set()
        owned: set[str] = set()  # parameters of layers that say what they load
        for module_name, module in self.named_modules():
            if isinstance(module, CheckpointLoadable):
                for tensor_name in module.checkpoint_tensor_names():
                    names.update(self._unfused_names(f"{module_name}.{tensor_name}"))
                own = module.named_parameters(recurse=False)
                owned.update(f"{module_name}.{param_name}" for param_name, _ in own)
        for param_name, _ in self.named_parameters():
            if param_name not in owned:
                names.update(self._unfused_names(param_name))
        return names

    def load_checkpoint_weights(
        self, tensors: Iterable[tuple[str, torch.Tensor]], *, process: bool = True,
        model_naming: bool = False,
    ) -> None:
        """Copy checkpoint tensors into this model's parameters, fusing, slicing and
        quantising as its layers declare, then (`process`) run every layer's after-loading
        step; the builder defers that step when calibration runs in between.
        Raises CheckpointError naming any unexpected, mis-shaped or missing tensor.
        `model_naming`: the tensors are already in this model's names and layout (a sharded
        build re-slicing a whole model's tensors): no renaming, no transposing."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for checkpoint_name, tensor in tensors:
            name = checkpoint_name if model_naming else self.map_checkpoint_name(checkpoint_name)
            if name is None:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied: the embedding is the head
            if not model_naming:
                tensor = self.transform_checkpoint_tensor(name, tensor)
            if name == f"{self.embedding_name}.weight" and self._holds_tied_head_copy():
                # A last pipeline stage without the embedding: its head is the tied matrix.
                self.lm_head.load_checkpoint_tensor("weight", tensor, source_name=checkpoint_name)
                loaded.add("lm_head.weight")
            fused_name, part_id = self._fused_name(name)
            module_name, _, tensor_name = fused_name.rpartition(".")
            if is_on_other_stage(module_name, modules):
                continue  # another pipeline stage's tensor
            module = modules.get(module_name)
            if isinstance(module, CheckpointLoadable):
                if tensor_name not in module.checkpoint_tensor_names():
                    raise self._does_not_belong(checkpoint_name)
                for part_id, part in self.split_checkpoint_tensor(name, tensor) or [(part_id, tensor)]:
                    module.load_checkpoint_tensor(
                        tensor_name, part, part_id=part_id, source_name=checkpoint_name
                    )
            elif part_id is None and fused_name in params:
                default_weight_loader(params[fused_name], tensor, checkpoint_name)
            else:
                raise self._does_not_belong(checkpoint_name)
            loaded.add(name)
        missing = sorted(self.expected_checkpoint_names() - loaded)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")
        if process:
            self.process_weights_after_loading()

    def _does_not_belong(self, checkpoint_name: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint tensor {checkpoint_name!r} does not belong to "
            f"{self.config.architecture} with this config"
        )

    def process_weights_after_loading(self) -> None:
        """Every layer's build-time step after its tensors are in (quantisation)."""
        for module in self.modules():
            if isinstance(module, CheckpointLoadable):
                self.process_layer(module)

    def process_layer(self, layer: CheckpointLoadable) -> None:
        """One layer's after-loading step; a weight with inf or NaN (its quantisation scales
        are not finite) becomes a KilnError naming the checkpoint tensor and row."""
        try:
            layer.process_weights_after_loading()
        except NonFiniteWeightError as error:
            name, row = self.checkpoint_row(layer, error.row)
            raise KilnError(f"{name} has non-finite values (row {row}); kiln cannot "
                            f"quantise it") from None

    def checkpoint_row(self, layer: CheckpointLoadable, row: int) -> tuple[str, int]:
        """A row of a layer's (out, in) weight on this rank → (the checkpoint tensor it was
        loaded from, its row there): a fused layer's (q|k|v, gate|up) rows come from several
        tensors, and a tensor-parallel rank holds a slice of each."""
        prefix = getattr(layer, "prefix", "")
        fused = prefix.rpartition(".")[2]
        sources = {part_id: source
                   for source, part_id in self.packed_modules_mapping.get(fused, ())}
        for part_id in getattr(layer, "part_ids", ()):
            place = layer.placement(part_id)
            if 0 <= row - place.output_offset < place.output_size:
                source = sources.get(part_id)
                name = (f"{prefix.removesuffix(fused)}{source}.weight" if source
                        else f"{prefix}.weight")
                return name, row - place.output_offset + place.output_start
        return f"{prefix}.weight", row

    def engine_state_dict(self) -> dict[str, torch.Tensor]:
        """The fused parameters as stored in an engine file (tied weights stored once)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def compute_dtype_names(self) -> set[str]:
        """The engine tensors in the model's compute dtype (plain weights, norms, biases,
        embeddings): the build casts them to the engine dtype and the loader to the
        runtime's. The rest (packed ints, FP8, scales) keep their own dtype bit-exactly."""
        return {name for name, p in self.named_parameters() if not has_fixed_dtype(p)}


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

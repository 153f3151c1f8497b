"""GPT-2: LayerNorm, GELU (tanh), learned absolute positions, fused c_attn, Conv1D weights.

Parameter names follow the Hugging Face checkpoint (transformer.h.N.attn.c_attn, ...). HF's
Conv1D stores weights as (in, out); they are transposed once at build time so every linear
in kiln is (out, in).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.errors import CheckpointError
from kiln.layers.activation import get_activation
from kiln.layers.attention import Attention
from kiln.layers.embedding import VocabParallelEmbedding
from kiln.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kiln.layers.norm import LayerNorm
from kiln.models.base import CausalLM, hf_eos_ids, hf_get
from kiln.models.config import ModelConfig
from kiln.models.registry import register_model
from kiln.parallel.pipeline import OtherStage, stage_modules
from kiln.parallel.state import ParallelState
from kiln.quant.config import QuantConfig

_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, *, quant_config: QuantConfig, parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        # q|k|v fused in the checkpoint already: split into its parts at loading
        # (GPT2LMHeadModel.split_checkpoint_tensor) so each rank takes its heads of each.
        self.c_attn = QKVParallelLinear(
            hidden, config.head_dim, config.num_heads, config.num_heads, bias=True,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.c_attn",
        )
        self.q_size = self.c_attn.num_heads * config.head_dim
        self.c_proj = RowParallelLinear(
            hidden, hidden, bias=True,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.c_proj",
        )
        self.attn = Attention(
            self.c_attn.num_heads, config.head_dim, self.c_attn.num_heads,
            scale=config.head_dim**-0.5,
        )

    def forward(self, hidden, kv_cache, metadata):
        q, k, v = self.c_attn(hidden).split(self.q_size, dim=-1)  # 3 × (T, H / tp)
        return self.c_proj(self.attn(q, k, v, kv_cache, metadata))


class GPT2MLP(nn.Module):
    def __init__(
        self, config: ModelConfig, *, quant_config: QuantConfig, parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, bias=True,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.c_fc",
        )
        self.c_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=True,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.c_proj",
        )
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(
        self, config: ModelConfig, *, quant_config: QuantConfig, parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.norm_eps)
        self.attn = GPT2Attention(
            config, quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.attn"
        )
        self.ln_2 = LayerNorm(config.hidden_size, config.norm_eps)
        self.mlp = GPT2MLP(
            config, quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.mlp"
        )

    def forward(self, hidden, kv_cache, metadata):
        hidden = hidden + self.attn(self.ln_1(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    """The decoder stack, or one pipeline stage of it (kiln/parallel/pipeline.py)."""

    def __init__(
        self, config: ModelConfig, *, quant_config: QuantConfig, parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.hidden_size = config.hidden_size
        first, last = parallel.is_first_stage, parallel.is_last_stage
        self.wte = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, parallel=parallel, prefix=f"{prefix}.wte"
        ) if first else OtherStage()
        self.wpe = VocabParallelEmbedding(
            config.max_position_embeddings, config.hidden_size, parallel=parallel,
            prefix=f"{prefix}.wpe",
        ) if first else OtherStage()
        self.h, self.stage_layers = stage_modules(
            parallel, config.num_layers,
            lambda i: GPT2Block(
                config, quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.h.{i}"
            ),
        )
        self.ln_f = LayerNorm(config.hidden_size, config.norm_eps) if last else OtherStage()

    def forward(self, input_ids, positions, kv_caches, metadata):
        if self.parallel.is_first_stage:
            hidden = self.wte(input_ids) + self.wpe(positions)  # (T, H)
        else:  # the previous stage's output
            weight = self.stage_layers[0].ln_1.weight
            (hidden,) = self.parallel.recv_activations(
                [(input_ids.shape[0], self.hidden_size)], weight.dtype, weight.device)
        for block, kv_cache in zip(self.stage_layers, kv_caches):
            hidden = block(hidden, kv_cache, metadata)
        if not self.parallel.is_last_stage:
            self.parallel.send_activations([hidden])
            return hidden
        return self.ln_f(hidden)


@register_model("GPT2LMHeadModel")
class GPT2LMHeadModel(CausalLM):
    # Buffers some GPT-2 checkpoints carry (the causal mask), not weights.
    ignored_checkpoint_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: ModelConfig, *, quant_config: QuantConfig | None = None,
                 parallel: ParallelState | None = None) -> None:
        super().__init__(config, quant_config=quant_config, parallel=parallel)
        self.transformer = GPT2Model(
            config, quant_config=self.quant_config, parallel=self.parallel, prefix="transformer"
        )
        self.lm_head = self.make_lm_head(self.transformer.wte)

    embedding_name = "transformer.wte"

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    def map_checkpoint_name(self, name: str) -> str | None:
        if name.endswith(self.ignored_checkpoint_suffixes):
            return None
        # The original OpenAI-converted checkpoints omit the "transformer." prefix.
        if name.startswith(("h.", "wte.", "wpe.", "ln_f.")):
            return "transformer." + name
        return name

    def split_checkpoint_tensor(self, name: str, tensor: torch.Tensor):
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            return list(zip(("q", "k", "v"), tensor.chunk(3, dim=0)))  # (out, in) after transform
        return None

    def transform_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t().contiguous() if name.endswith(_CONV1D_WEIGHTS) else tensor

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise CheckpointError(f"GPT-2 option {flag}=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise CheckpointError("GPT-2 option scale_attn_weights=false is not supported")
        hidden = hf_get(hf, "n_embd")
        num_heads = hf_get(hf, "n_head")
        return ModelConfig(
            architecture="GPT2LMHeadModel",
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=hf_get(hf, "n_inner", default=4 * hidden),
            num_layers=hf_get(hf, "n_layer"),
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=hidden // num_heads,
            max_position_embeddings=hf_get(hf, "n_positions"),
            norm_eps=float(hf_get(hf, "layer_norm_epsilon", default=1e-5)),
            hidden_act=hf_get(hf, "activation_function", default="gelu_new"),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=hf_eos_ids(hf),
        )

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
from kiln.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from kiln.layers.norm import LayerNorm
from kiln.models.base import CausalLM, hf_eos_ids, hf_get
from kiln.models.config import ModelConfig
from kiln.models.registry import register_model
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
        # q|k|v fused in the checkpoint already; kept whole until TP > 1 needs head slicing
        # (GPT2LMHeadModel refuses tp > 1 until then).
        self.c_attn = ReplicatedLinear(
            hidden, 3 * hidden, bias=True,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.c_attn",
        )
        self.c_proj = RowParallelLinear(
            hidden, hidden, bias=True,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.c_proj",
        )
        self.attn = Attention(
            config.num_heads, config.head_dim, config.num_heads, scale=config.head_dim**-0.5
        )

    def forward(self, hidden, kv_cache, metadata):
        q, k, v = self.c_attn(hidden).chunk(3, dim=-1)  # 3 × (T, H)
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
    def __init__(
        self, config: ModelConfig, *, quant_config: QuantConfig, parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, parallel=parallel, prefix=f"{prefix}.wte"
        )
        self.wpe = VocabParallelEmbedding(
            config.max_position_embeddings, config.hidden_size, parallel=parallel,
            prefix=f"{prefix}.wpe",
        )
        self.h = nn.ModuleList(
            GPT2Block(
                config, quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.h.{i}"
            )
            for i in range(config.num_layers)
        )
        self.ln_f = LayerNorm(config.hidden_size, config.norm_eps)

    def forward(self, input_ids, positions, kv_caches, metadata):
        hidden = self.wte(input_ids) + self.wpe(positions)  # (T, H)
        for block, kv_cache in zip(self.h, kv_caches):
            hidden = block(hidden, kv_cache, metadata)
        return self.ln_f(hidden)


@register_model("GPT2LMHeadModel")
class GPT2LMHeadModel(CausalLM):
    # Buffers some GPT-2 checkpoints carry (the causal mask), not weights.
    ignored_checkpoint_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: ModelConfig, *, quant_config: QuantConfig | None = None,
                 parallel: ParallelState | None = None) -> None:
        super().__init__(config, quant_config=quant_config, parallel=parallel)
        if self.parallel.tp_size > 1:
            raise ValueError(
                f"GPT-2 does not support tensor parallelism yet (tp {self.parallel.tp_size}): "
                f"its fused c_attn is not split by heads; use tp 1"
            )
        self.transformer = GPT2Model(
            config, quant_config=self.quant_config, parallel=self.parallel, prefix="transformer"
        )
        tied = self.transformer.wte if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, tied_to=tied, parallel=self.parallel,
            prefix="lm_head",
        )

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

"""Llama and its close relatives: Llama 2/3/3.1/3.2, Mistral (sliding window), Qwen2 (QKV
bias), Qwen3 (per-head q/k RMSNorm). One declaration; the differences are config flags."""

from __future__ import annotations

import torch
from torch import nn

from kiln.errors import CheckpointError
from kiln.layers.activation import SiluAndMul
from kiln.layers.attention import Attention
from kiln.layers.embedding import VocabParallelEmbedding
from kiln.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import RotaryEmbedding
from kiln.models.base import CausalLM, hf_eos_ids, hf_get, hf_rope
from kiln.models.config import ModelConfig
from kiln.models.registry import register_model
from kiln.parallel.pipeline import OtherStage, stage_modules
from kiln.parallel.state import ParallelState
from kiln.quant.config import QuantConfig


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_index: int, rotary_emb: RotaryEmbedding, *,
        quant_config: QuantConfig, parallel: ParallelState, prefix: str,
    ) -> None:
        super().__init__()
        c = config
        self.qkv_proj = QKVParallelLinear(
            c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, bias=c.qkv_bias,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.o_proj",
        )
        self.q_size = self.qkv_proj.num_heads * c.head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * c.head_dim
        self.head_dim = c.head_dim
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)
        # Shared by every layer: one cos/sin table (64 MiB at 128k positions), not one each.
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.qkv_proj.num_heads,
            c.head_dim,
            self.qkv_proj.num_kv_heads,
            scale=c.head_dim**-0.5,
            sliding_window=c.sliding_windows[layer_index] if c.sliding_windows else None,
        )
        self.qk_norm = c.qk_norm

    def forward(self, positions, hidden, kv_cache, metadata):
        qkv = self.qkv_proj(hidden)  # (T, (Hq + 2 Hkv) * D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.q_size // self.head_dim, self.head_dim)  # (T, Hq, D)
        k = k.reshape(-1, self.kv_size // self.head_dim, self.head_dim)  # (T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(
            q.flatten(1), k.flatten(1), v, kv_cache, metadata,
            positions=positions, rotary_emb=self.rotary_emb,
        )
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(
        self, config: ModelConfig, *, quant_config: QuantConfig, parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise CheckpointError(
                f"hidden_act {config.hidden_act!r} is not supported for "
                f"{config.architecture}; supported: silu"
            )
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias=config.mlp_bias,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, bias=config.mlp_bias,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.down_proj",
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    # Outputs read by one linear only, which kiln/quant/activation_fusion.py may have the
    # producer quantise for an FP8 linear.
    fp8_activation_producers = (
        ("input_layernorm", "self_attn.qkv_proj"),
        ("post_attention_layernorm", "mlp.gate_up_proj"),
        ("mlp.act", "mlp.down_proj"),
    )

    def __init__(
        self, config: ModelConfig, layer_index: int, rotary_emb: RotaryEmbedding, *,
        quant_config: QuantConfig, parallel: ParallelState, prefix: str,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(
            config, layer_index, rotary_emb,
            quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.self_attn",
        )
        self.mlp = LlamaMLP(
            config, quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.mlp"
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        # The residual stream is carried separately so each norm can fuse the add.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """The decoder stack, or one pipeline stage of it (kiln/parallel/pipeline.py)."""

    def __init__(
        self, config: ModelConfig, *, quant_config: QuantConfig, parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.hidden_size = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, parallel=parallel,
            prefix=f"{prefix}.embed_tokens",
        ) if parallel.is_first_stage else OtherStage()
        rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers, self.stage_layers = stage_modules(
            parallel, config.num_layers,
            lambda i: LlamaDecoderLayer(
                config, i, rotary_emb,
                quant_config=quant_config, parallel=parallel, prefix=f"{prefix}.layers.{i}",
            ),
        )
        self.norm = (RMSNorm(config.hidden_size, config.norm_eps) if parallel.is_last_stage
                     else OtherStage())

    def forward(self, input_ids, positions, kv_caches, metadata):
        if self.parallel.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids), None  # (T, H)
        else:  # the previous stage's hidden and residual streams
            weight = self.stage_layers[0].input_layernorm.weight
            shape = (input_ids.shape[0], self.hidden_size)
            hidden, residual = self.parallel.recv_activations(
                [shape, shape], weight.dtype, weight.device)
        for layer, kv_cache in zip(self.stage_layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        if not self.parallel.is_last_stage:
            self.parallel.send_activations([hidden, residual])
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden


@register_model(
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
)
class LlamaForCausalLM(CausalLM):
    packed_modules_mapping = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }

    def __init__(self, config: ModelConfig, *, quant_config: QuantConfig | None = None,
                 parallel: ParallelState | None = None) -> None:
        super().__init__(config, quant_config=quant_config, parallel=parallel)
        self.model = LlamaModel(
            config, quant_config=self.quant_config, parallel=self.parallel, prefix="model"
        )
        self.lm_head = self.make_lm_head(self.model.embed_tokens)

    embedding_name = "model.embed_tokens"

    @property
    def backbone(self) -> nn.Module:
        return self.model

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        architecture = hf["architectures"][0]
        model_type = hf.get("model_type", "")
        num_heads = hf_get(hf, "num_attention_heads")
        hidden = hf_get(hf, "hidden_size")
        num_layers = hf_get(hf, "num_hidden_layers")
        rope_theta, rope_scaling = hf_rope(hf)
        return ModelConfig(
            architecture=architecture,
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=hf_get(hf, "intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf_get(hf, "num_key_value_heads", default=num_heads),
            head_dim=hf_get(hf, "head_dim", default=hidden // num_heads),
            max_position_embeddings=hf_get(hf, "max_position_embeddings"),
            norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-6)),
            hidden_act=hf_get(hf, "hidden_act", default="silu"),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=False)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # Qwen2 always has q/k/v biases; Qwen3 and Llama say so in attention_bias.
            qkv_bias=architecture == "Qwen2ForCausalLM"
            or bool(hf.get("attention_bias", False)),
            o_bias=architecture != "Qwen2ForCausalLM" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_windows=_sliding_windows(hf, model_type, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=hf_eos_ids(hf),
        )


def _sliding_windows(hf: dict, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer window, following each HF config class's own rules."""
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if model_type in ("qwen2", "qwen3"):
            first_sliding = hf.get("max_window_layers", num_layers)
            layer_types = [
                "sliding_attention" if i >= first_sliding else "full_attention"
                for i in range(num_layers)
            ]
        else:
            layer_types = ["sliding_attention"] * num_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)

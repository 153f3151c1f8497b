"""What a model is built with stays with it: every linear layer carries its own name (the
`prefix` a quantisation scheme picks by), and every layer the ParallelState its model was
given, so two models with different states live side by side in one process."""

from __future__ import annotations

import pytest
import torch

from kiln.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln.layers.linear import LinearBase
from kiln.models.config import ModelConfig
from kiln.models.registry import get_model_class
from kiln.parallel.state import SINGLE_PROCESS, ParallelState

LLAMA = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=11, hidden_size=32, intermediate_size=64,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
    norm_eps=1e-5, qkv_bias=True, sliding_windows=(None, None),
)
GPT2 = ModelConfig(
    architecture="GPT2LMHeadModel", vocab_size=11, hidden_size=32, intermediate_size=64,
    num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=64,
    norm_eps=1e-5, hidden_act="gelu_new", tie_word_embeddings=True,
)
# No collective runs while building, so the process group can be a stand-in.
TP2_RANK1 = ParallelState(tp_rank=1, tp_size=2, tp_group=object())


def build(config: ModelConfig, parallel: ParallelState | None = None):
    with torch.device("meta"):
        return get_model_class(config.architecture)(config, parallel=parallel)


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_every_linear_layer_is_named_as_in_the_model(config):
    layers = {name: m for name, m in build(config).named_modules() if isinstance(m, LinearBase)}
    assert layers and all(layer.prefix == name for name, layer in layers.items())


def test_two_models_keep_their_own_parallel_state():
    single, sharded = build(LLAMA), build(LLAMA, TP2_RANK1)
    for model, parallel in ((single, SINGLE_PROCESS), (sharded, TP2_RANK1)):
        sliced = [m for m in model.modules()
                  if isinstance(m, (LinearBase, VocabParallelEmbedding, ParallelLMHead))]
        assert sliced and all(m.parallel is parallel for m in sliced)
    attention = sharded.model.layers[0].self_attn
    assert attention.qkv_proj.weight.shape == (2 * 8 + 2 * 1 * 8, 32)  # 2 q heads, 1 k, 1 v
    assert attention.o_proj.weight.shape == (32, 16)
    assert attention.attn.num_heads == 2 and attention.attn.num_kv_heads == 1
    assert sharded.model.embed_tokens.weight.shape == (6, 32)  # vocab 11 → 12, halved
    assert sharded.lm_head.vocab_size == single.lm_head.vocab_size == 11
    assert single.model.embed_tokens.weight.shape == (11, 32)


def test_unsupported_splits_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"num_attention_heads 4 is not divisible by tp 3"):
        build(LLAMA, ParallelState(tp_rank=0, tp_size=3, tp_group=object()))
    with pytest.raises(ValueError, match=r"cannot be split over 8 pipeline stages"):
        build(LLAMA, ParallelState.for_slicing(1, 8, 0))


def test_gpt2_splits_its_fused_c_attn_by_heads():
    sharded = build(GPT2, TP2_RANK1)
    attention = sharded.transformer.h[0].attn
    head_dim = GPT2.hidden_size // GPT2.num_heads
    assert attention.c_attn.weight.shape == (3 * GPT2.num_heads // 2 * head_dim, GPT2.hidden_size)
    assert attention.attn.num_heads == attention.attn.num_kv_heads == GPT2.num_heads // 2


def test_pipeline_stages_hold_contiguous_layers_and_their_ends():
    from kiln.parallel.pipeline import OtherStage

    first, last = (build(LLAMA, ParallelState.for_slicing(1, 2, rank)) for rank in (0, 1))
    first_layers = [i for i, m in enumerate(first.model.layers) if not isinstance(m, OtherStage)]
    last_layers = [i for i, m in enumerate(last.model.layers) if not isinstance(m, OtherStage)]
    assert first_layers + last_layers == list(range(LLAMA.num_layers))
    assert isinstance(first.lm_head, OtherStage) and isinstance(first.model.norm, OtherStage)
    assert isinstance(last.model.embed_tokens, OtherStage)
    assert isinstance(last.lm_head, ParallelLMHead)
    # Stage files hold only their own tensors: no name of one stage's is in the other's.
    assert not set(first.engine_state_dict()) & set(last.engine_state_dict())

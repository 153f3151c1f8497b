"""Llama-3.1's rope scaling at long positions against Hugging Face: the inverse frequencies
and the rotated q and k at positions up to 131,071 (the model's whole context), where an
error in the scaled low frequencies would show first."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from kiln.kernels.rope import rope_reference
from kiln.layers.rotary import RotaryEmbedding, rope_inverse_frequencies
from kiln.compiler.presets import PRESETS

LLAMA_31 = PRESETS["llama-3.1-8b"]
HEAD_DIM = LLAMA_31["hidden_size"] // LLAMA_31["num_attention_heads"]
MAX_POSITIONS = LLAMA_31["max_position_embeddings"]
POSITIONS = [0, 1, 4095, 8191, 8192, 16_000, 65_536, 100_003, MAX_POSITIONS - 1]


def hf_config() -> transformers.LlamaConfig:
    # A tiny model except for the rope: head_dim, theta, scaling and context of Llama-3.1.
    return transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=8, num_hidden_layers=1, vocab_size=16,
        max_position_embeddings=MAX_POSITIONS, rope_theta=LLAMA_31["rope_theta"],
        rope_scaling=dict(LLAMA_31["rope_scaling"]),
    )


def test_inverse_frequencies_equal_hugging_face():
    hf_rotary = modeling_llama.LlamaRotaryEmbedding(hf_config())
    ours = rope_inverse_frequencies(HEAD_DIM, LLAMA_31["rope_theta"], LLAMA_31["rope_scaling"])
    torch.testing.assert_close(ours, hf_rotary.inv_freq.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_query_and_key_equal_hugging_face_at_long_positions(dtype):
    generator = torch.Generator().manual_seed(0)
    positions = torch.tensor(POSITIONS, dtype=torch.int64)
    query = torch.randn(len(POSITIONS), 2, HEAD_DIM, generator=generator).to(dtype)
    key = torch.randn(len(POSITIONS), 1, HEAD_DIM, generator=generator).to(dtype)
    rotary = RotaryEmbedding(HEAD_DIM, MAX_POSITIONS, LLAMA_31["rope_theta"],
                             LLAMA_31["rope_scaling"])
    ours_q, ours_k = rope_reference(positions, query, key, rotary.cos_sin_cache)

    hf_rotary = modeling_llama.LlamaRotaryEmbedding(hf_config())
    # HF's layout: (batch, heads, tokens, head_dim); cos/sin (batch, tokens, head_dim).
    cos, sin = hf_rotary(query.float(), positions[None])
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(
        query.float().transpose(0, 1)[None], key.float().transpose(0, 1)[None], cos, sin)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else \
        {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ours_q.float(), hf_q[0].transpose(0, 1), **tolerance)
    torch.testing.assert_close(ours_k.float(), hf_k[0].transpose(0, 1), **tolerance)

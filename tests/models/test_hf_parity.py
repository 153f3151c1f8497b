"""Hugging Face transformers is the oracle: random-weight models from small configs, built
into kiln engines, must give the same prefill logits, the same logits at every one of 32
greedy decode steps, and the same greedy tokens.

Tolerance: 1e-4 relative (Frobenius norm) in float32. Both sides compute the same function
in float32; the remaining difference is summation order (attention over gathered blocks,
fused q|k|v and gate|up matmuls), which stays around 1e-6 at these sizes.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig
from tests.helpers import SequenceRunner, hf_greedy, save_tiny_hf_model

RELATIVE_TOLERANCE = 1e-4
DECODE_STEPS = 32

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CONFIGS = {
    "llama-gqa-untied": transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
    ),
    "llama-mha-tied-bias": transformers.LlamaConfig(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100, max_position_embeddings=256,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
    ),
    "llama3-rope-odd-heads-mqa": transformers.LlamaConfig(
        hidden_size=72, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=1, vocab_size=90, max_position_embeddings=512,
        rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
    ),
    "llama-explicit-head-dim": transformers.LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=8, vocab_size=128, max_position_embeddings=256,
    ),
    "mistral-sliding-window": transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=128, max_position_embeddings=256, sliding_window=8,
    ),
    "qwen2-bias-sliding-upper-layers": transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=6, max_window_layers=1,
    ),
    "qwen2-tied": transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=100, max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "qwen3-qk-norm": transformers.Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=256,
    ),
    "gpt2-tied": transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
    ),
    "gpt2-untied-inner": transformers.GPT2Config(
        n_embd=48, n_layer=3, n_head=3, n_inner=80, vocab_size=100, n_positions=128,
        tie_word_embeddings=False,
    ),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_greedy_decode_match_transformers(name, tmp_path):
    config = CONFIGS[name]
    config._attn_implementation = "eager"
    hf_model = save_tiny_hf_model(config, tmp_path / "hf")
    build_engine(tmp_path / "hf", tmp_path / "engine", BuildConfig(dtype="float32"), progress=False)
    runner = SequenceRunner(tmp_path / "engine", block_size=4)

    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, config.vocab_size, (11,), generator=generator).tolist()
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0]
    logits = runner.step(prompt)
    assert relative_error(logits, expected) <= RELATIVE_TOLERANCE

    tokens = list(prompt)
    for _ in range(DECODE_STEPS):
        next_token = int(logits[-1].argmax())
        tokens.append(next_token)
        logits = runner.step([next_token])
        with torch.no_grad():
            expected = hf_model(torch.tensor([tokens])).logits[0, -1:]
        assert relative_error(logits, expected) <= RELATIVE_TOLERANCE

    assert tokens[len(prompt):] == hf_greedy(hf_model, prompt, DECODE_STEPS)

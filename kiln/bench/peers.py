"""Peers measured in the same run on the same card: Hugging Face transformers with a static
KV cache, on a random-weight model of the engine's shape."""

from __future__ import annotations

import time

import torch

from kiln.models.config import ModelConfig


def hf_config_for(config: ModelConfig):
    import transformers

    if config.architecture != "LlamaForCausalLM":
        raise ValueError(f"the transformers peer is wired for Llama shapes, not {config.architecture}")
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling, tie_word_embeddings=config.tie_word_embeddings,
    )


def hf_static_cache_decode(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, prompt_len: int, new_tokens: int
) -> dict:
    """Batch-1 greedy decode tok/s of transformers' generate with cache_implementation="static"
    (second of two runs, so compilation and warm-up stay out of the figure)."""
    import transformers

    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config_for(config), dtype=dtype)
    model.eval()
    prompt = torch.randint(100, config.vocab_size, (1, prompt_len), device=device)
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                cache_implementation="static", pad_token_id=0,
            )
        torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    generated = output.shape[1] - prompt_len
    del model
    torch.cuda.empty_cache()
    return {"hf_static_tok_s": generated / seconds[-1], "hf_static_seconds": seconds[-1]}

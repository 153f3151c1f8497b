"""Shared by the scheme tests: one tiny random Llama checkpoint, engines built from it with
each scheme, the logits of a fixed token sequence through an engine (prefill, then decode
steps), and the oracle for weight-only engines: the Hugging Face model with its matrices
replaced by the engine's dequantised weights."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from kiln.compiler.builder import build_engine
from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    quantize_fp8_per_token_reference,
)
from kiln.runtime.kv_tensors import (
    KVCacheSpec,
    allocate_kv_caches,
    apply_kv_scales,
    kv_cache_torch_dtype,
)
from tests.checkpoint.test_gguf import write_tiny_gguf
from tests.helpers import save_tiny_hf_model, tiny_llama_config
from tests.models.model_inputs import step_inputs

PROMPT = [3, 17, 42, 5, 9, 60, 11]
DECODE = [7, 8, 9]  # fixed continuation tokens: every engine sees the same inputs
BLOCK_SIZE = 4


def tiny_quant_llama(directory: Path) -> Path:
    """A tiny Llama whose matrices the kernels can tile: hidden 128, FFN 256, 4 heads (2 KV)."""
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=2)
    save_tiny_hf_model(config, directory / "hf")
    return directory / "hf"


def tiny_gguf_and_text(directory: Path, words: list[str]) -> Path:
    """A tiny GGUF Llama with a tokenizer (directory / "tiny.gguf": hidden 64, 2 layers, 4
    heads / 2 KV, vocabulary 48) and calibration text of `words` (directory / "text.txt")."""
    write_tiny_gguf(directory / "tiny.gguf", hidden=64, inter=128, heads=4, kv_heads=2,
                    layers=2, vocab=48)
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(40))
    (directory / "text.txt").write_text(text)
    return directory


def build(source: Path, output: Path, **build_config) -> Path:
    build_engine(source, output, BuildConfig(dtype="bfloat16", **build_config), progress=False)
    return output


@torch.no_grad()
def logits_of(engine_dir: Path, dtype: torch.dtype = torch.float32,
              kv_cache_dtype: str = "auto") -> torch.Tensor:
    """(len(PROMPT) + len(DECODE), V) float32 logits of the engine loaded in `dtype` on the
    CPU, with its KV cache in kv_cache_dtype (EngineConfig's names; "auto": the build's)."""
    engine = open_engine(engine_dir)
    model = load_engine_model(engine, dtype=dtype)
    build_section = engine.manifest["build"]
    cache_dtype = kv_cache_torch_dtype(kv_cache_dtype, dtype, build_section)
    apply_kv_scales(model, build_section, cache_dtype)
    caches = allocate_kv_caches(KVCacheSpec.of_model(model, cache_dtype), 8, BLOCK_SIZE)
    block_ids = [5, 2, 7]  # out of order: the block table is honoured
    rows, done = [], 0
    for tokens in [PROMPT] + [[t] for t in DECODE]:
        ids, positions, metadata = step_inputs(tokens, done, block_ids, BLOCK_SIZE)
        rows.append(model.compute_logits(model(ids, positions, caches, metadata)).float())
        done += len(tokens)
    return torch.cat(rows)


def dequantised_weights(engine_dir: Path) -> dict[str, torch.Tensor]:
    """The engine's linear weights as float32 HF tensors (q/k/v/o/gate/up/down_proj)."""
    engine = open_engine(engine_dir)
    tensors = load_file(str(engine.rank_file(0)))
    config = engine.model_config
    head_dim = config.hidden_size // config.num_heads
    q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
    out = {}
    for layer in range(config.num_layers):
        for module, parts in (("self_attn.qkv_proj", [("self_attn.q_proj", q_rows),
                                                       ("self_attn.k_proj", kv_rows),
                                                       ("self_attn.v_proj", kv_rows)]),
                              ("self_attn.o_proj", [("self_attn.o_proj", None)]),
                              ("mlp.gate_up_proj", [("mlp.gate_proj", config.intermediate_size),
                                                    ("mlp.up_proj", config.intermediate_size)]),
                              ("mlp.down_proj", [("mlp.down_proj", None)])):
            prefix = f"model.layers.{layer}.{module}"
            if f"{prefix}.qweight" in tensors:
                weight = dequantize_int4(tensors[f"{prefix}.qweight"],
                                         tensors[f"{prefix}.weight_scale"],
                                         tensors[f"{prefix}.weight_zero"])
            elif tensors[f"{prefix}.weight"].dtype == torch.int8:
                weight = dequantize_int8(tensors[f"{prefix}.weight"],
                                         tensors[f"{prefix}.weight_scale"])
            elif tensors[f"{prefix}.weight"].dtype == torch.float8_e4m3fn:
                weight = (tensors[f"{prefix}.weight"].float()
                          * tensors[f"{prefix}.weight_scale"][:, None])
            else:
                weight = tensors[f"{prefix}.weight"].float()
            start = 0
            for name, rows in parts:
                rows = rows or weight.shape[0]
                out[f"model.layers.{layer}.{name}.weight"] = weight[start:start + rows]
                start += rows
    return out


@torch.no_grad()
def hf_logits_with(hf_dir: Path, weights: dict[str, torch.Tensor],
                   rounded_to: torch.dtype = torch.bfloat16,
                   fp8_activations: bool = False) -> torch.Tensor:
    """The HF model's float32 logits over PROMPT + DECODE with `weights` substituted and its
    other parameters rounded through `rounded_to` (the engine's dtype). fp8_activations:
    every substituted linear layer's input goes through per-token E4M3 first (W8A8)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in state.items():
        tensor.copy_(weights[name] if name in weights else tensor.to(rounded_to).float())
    if fp8_activations:
        for name, module in model.named_modules():
            if f"{name}.weight" in weights:
                module.register_forward_pre_hook(_fake_quantise_input)
    model.eval()
    return model(torch.tensor([PROMPT + DECODE])).logits[0].float()


def _fake_quantise_input(module, inputs):
    x = inputs[0]
    q, scale = quantize_fp8_per_token_reference(x.reshape(-1, x.shape[-1]))
    return ((q.float() * scale).reshape(x.shape),)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out - reference).norm() / reference.norm()).item()

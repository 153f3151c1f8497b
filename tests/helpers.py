"""Shared test helpers: tiny random Hugging Face models (no downloads), a tiny engine built
from one, a CPU engine over it run to completion, and a minimal single-sequence forward
loop over the paged KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import open_engine
from kiln.runtime.input_batch import BatchRow, prepare_inputs
from kiln.runtime.kv_tensors import KVCacheSpec, allocate_kv_caches


def save_tiny_hf_model(config: transformers.PretrainedConfig, directory: Path, seed: int = 0):
    """A random-weight float32 HF model saved as safetensors; returns the model (eval)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random (not init-default) norms and biases, so a mis-loaded one cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name or "ln" in name else 0.0))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


class SequenceRunner:
    """Feeds one sequence through a kiln model: prefill then one token at a time."""

    def __init__(self, engine_dir: Path, block_size: int = 4, num_blocks: int = 64):
        self.engine = open_engine(engine_dir)
        self.model = load_engine_model(self.engine)
        self.block_size = block_size
        self.kv_caches = allocate_kv_caches(
            KVCacheSpec.of_model(self.model, self.engine.dtype), num_blocks, block_size
        )
        # Deliberately non-contiguous, shuffled blocks: the block table must be honoured.
        self.block_ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
        self.num_computed = 0

    @torch.no_grad()
    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (len(token_ids), V) for the given new tokens."""
        request = BatchRow(
            request_id="r",
            token_ids=token_ids,
            num_computed_tokens=self.num_computed,
            block_ids=self.block_ids,
            logits_offsets=tuple(range(len(token_ids))),
        )
        inputs = prepare_inputs([request], self.block_size)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        self.num_computed += len(token_ids)
        return self.model.compute_logits(hidden)


def tiny_llama_config(**overrides) -> transformers.LlamaConfig:
    """A tiny Llama (2 layers, hidden 32, GQA 2:1, vocab 64, 128 positions); keyword
    arguments override any LlamaConfig field."""
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                  max_position_embeddings=128)
    return transformers.LlamaConfig(**{**fields, **overrides})


@torch.no_grad()
def build_tiny_engine(directory: Path, **config) -> Path:
    """A float32 engine of tiny_llama_config(**config) built under `directory`; returns its
    directory (the HF model is saved beside it, in directory / "hf")."""
    from kiln.compiler.builder import build_engine
    from kiln.config import BuildConfig

    save_tiny_hf_model(tiny_llama_config(**config), directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="float32"), progress=False)
    return directory / "engine"


def make_cpu_engine(engine_dir: Path, **knobs):
    """An LLMEngine on the CPU (block size 4 unless given) over an engine directory."""
    from kiln.config import EngineConfig
    from kiln.runtime.engine import LLMEngine

    knobs = {"device": "cpu", "block_size": 4, **knobs}
    return LLMEngine(open_engine(engine_dir), EngineConfig(**knobs))


def run_to_completion(engine, prompts: list, params: list, before_step=None) -> list:
    """Add every prompt (token id lists or prompt dicts) with its SamplingParams, step until
    the engine is idle, and return the final RequestOutputs in prompt order.
    `before_step(engine)`, if given, runs before each step."""
    request_ids = [
        engine.add_request(None, {"prompt_token_ids": p} if isinstance(p, list) else p, sp)
        for p, sp in zip(prompts, params)
    ]
    finished = {}
    while engine.has_unfinished_requests():
        if before_step is not None:
            before_step(engine)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return [finished[request_id] for request_id in request_ids]


def run_staggered(engine, prompts: list[list[int]], params, every: int) -> list[list[int]]:
    """Add one prompt every `every` steps while the earlier ones decode (so prompts land in
    mixed steps), step until idle; the output token ids in prompt order."""
    ids, done, step = [], {}, 0
    while len(ids) < len(prompts) or engine.has_unfinished_requests():
        if step % every == 0 and len(ids) < len(prompts):
            ids.append(engine.add_request(None, prompts[len(ids)], params))
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
        step += 1
    return [done[request_id] for request_id in ids]


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Plain argmax decoding with transformers' KV cache and no logits processors (generate()
    with min_new_tokens would ban EOS, which kiln's ignore_eos does not)."""
    output = model(torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    for _ in range(num_tokens):
        next_token = int(output.logits[0, -1].argmax())
        tokens.append(next_token)
        output = model(
            torch.tensor([[next_token]]), past_key_values=output.past_key_values, use_cache=True
        )
    return tokens

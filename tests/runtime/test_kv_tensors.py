"""The KV tensors are allocated uninitialised (50+ GB is never memset at start): only the null
block is zeroed. Poisoning every other block with NaN must change nothing, whatever the mix of
prefill chunks, prefix reuse and preemption: no position is read before it is written."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig, EngineConfig
from kiln.models.config import ModelConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.kv_tensors import NULL_BLOCK, allocate_kv_caches, kv_cache_bytes_per_block
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import save_tiny_hf_model

VOCAB = 128


def test_allocation_shapes_and_null_block(monkeypatch):
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
        norm_eps=1e-5,
    )
    # Hand out NaN-filled memory, as a reused GPU allocation may hold anything.
    real_empty = torch.empty

    def dirty_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(torch, "empty", dirty_empty)
    caches = allocate_kv_caches(config, num_blocks=6, block_size=4, dtype=torch.float32)
    monkeypatch.undo()
    assert len(caches) == 3
    for cache in caches:
        assert cache.shape == (2, 6, 4, 2, 16)
        assert torch.equal(cache[:, NULL_BLOCK], torch.zeros(2, 4, 2, 16))
        assert cache[:, 1:].isnan().all()  # not memset: left as allocated
    per_block = kv_cache_bytes_per_block(config, 4, torch.float32)
    assert per_block == caches[0][:, 0].numel() * 4 * 3


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kv")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
    )
    save_tiny_hf_model(config, directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="float32"), progress=False)
    return directory / "engine"


def run(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    """Greedy tokens of every prompt, and how many preemptions the run had."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in prompts]
    done, preemptions = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
                preemptions += sum(m.num_preemptions for m in output.metrics)
    return [done[i] for i in ids], preemptions


def test_unwritten_kv_is_never_read(engine_dir):
    generator = torch.Generator().manual_seed(5)
    shared = torch.randint(0, VOCAB, (12,), generator=generator).tolist()  # prefix reuse
    prompts = [
        shared + torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
        for n in torch.randint(1, 20, (24,), generator=generator)
    ]
    # A small token budget (chunked prefill) and 24 usable blocks for 24 requests of up to
    # 10 blocks each: preemption and recomputation.
    knobs = dict(device="cpu", block_size=4, max_num_batched_tokens=32, num_kv_blocks=25,
                 max_num_seqs=16)
    clean = LLMEngine(open_engine(engine_dir), EngineConfig(**knobs))
    for cache in clean.runner.kv_caches:
        cache.zero_()
    poisoned = LLMEngine(open_engine(engine_dir), EngineConfig(**knobs))
    for cache in poisoned.runner.kv_caches:
        cache[:, NULL_BLOCK + 1 :].fill_(math.nan)
    poisoned_tokens, preemptions = run(poisoned, prompts)
    assert preemptions > 0
    assert poisoned_tokens == run(clean, prompts)[0]

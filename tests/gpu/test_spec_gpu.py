"""Speculative decoding on the GPU: verify rows and the draft's forwards replay decode CUDA
graphs (batch × (1 + k) one-token rows), and greedy tokens equal a run without speculation
with both proposers, at batch 1 and 32."""

from __future__ import annotations

import random

import pytest

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig, EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import run_to_completion, save_tiny_hf_model, tiny_llama_config


def build_tiny_engine(directory, dtype: str):
    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=1024)
    save_tiny_hf_model(config, directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype=dtype), progress=False)
    return directory / "engine"


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("spec-gpu"), "float32")


def workload(batch: int):
    rng = random.Random(batch)
    prompts = [([rng.randrange(128) for _ in range(3)] * 5)[: rng.randint(4, 15)] for _ in range(batch)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(8, 40), ignore_eos=True)
              for _ in range(batch)]
    return prompts, params


def plain_run(engine_dir, config: EngineConfig, method: str, batch: int):
    """The workload's prompts and params, the plain engine's greedy tokens for them, and the
    speculative config (k = 4 fixed) to run them again with."""
    prompts, params = workload(batch)
    with LLMEngine.from_engine_dir(engine_dir, config) as plain:
        expected = [o.outputs[0].token_ids for o in run_to_completion(plain, prompts, params)]
    speculative = {"method": method, "num_speculative_tokens": 4, "adaptive": False}
    if method == "draft":
        speculative["model"] = str(engine_dir)
    return prompts, params, expected, speculative


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_tokens_equal_and_verify_steps_replay_graphs(engine_dir, method, batch):
    config = EngineConfig(max_num_seqs=256, max_model_len=512, num_kv_blocks=512)
    prompts, params, expected, speculative = plain_run(engine_dir, config, method, batch)
    with LLMEngine.from_engine_dir(engine_dir, config, speculative) as engine:
        got = [o.outputs[0].token_ids for o in run_to_completion(engine, prompts, params)]
        stats = engine.speculator.stats
        assert got == expected
        assert stats.num_verify_rows > 0
        # Every decode step (verify steps included) replayed a graph; only prefill is eager.
        assert engine.runner.graph_steps >= stats.num_verify_rows // batch
        assert engine.scheduler.kv_cache_manager.num_free_blocks == \
            engine.scheduler.kv_cache_manager.num_usable_blocks

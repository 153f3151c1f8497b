"""One engine or many per process, on the GPU: closing an engine gives back its device memory
(a 20 GB KV cache, CUDA graphs and their pool, weights) to within
100 MiB of what was in use before it, and the next engine in the same process runs as the
first did. Notebooks, test suites and sweeps build engines one after another."""

from __future__ import annotations

import gc

import pytest
import torch

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig, EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import run_to_completion, save_tiny_hf_model, tiny_llama_config

MiB = 2**20


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lifetime")
    config = tiny_llama_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                               max_position_embeddings=2048)
    save_tiny_hf_model(config, directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="bfloat16"),
                 progress=False)
    return directory / "engine"


def memory_in_use() -> tuple[int, int]:
    """(bytes torch has allocated, bytes in use on the device by anyone), settled."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return torch.cuda.memory_allocated(), total - free


def test_close_gives_the_memory_back_and_the_next_engine_works(engine_dir):
    prompts = [[5, 17, 300, 2, 9], list(range(100, 160))]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 2
    # 20 GB of KV cache (65,536 bytes a block), graphs up to 256 rows.
    config = EngineConfig(device="cuda", num_kv_blocks=300_000, max_num_seqs=256)
    allocated_before, used_before = memory_in_use()
    tokens, used_after = [], []
    for _ in range(3):
        with LLMEngine.from_engine_dir(engine_dir, config) as engine:
            assert engine.startup.kv_cache_bytes > 16 * 2**30
            assert engine.runner.graphs is not None
            outputs = run_to_completion(engine, prompts, params)
            tokens.append([o.outputs[0].token_ids for o in outputs])
        allocated, used = memory_in_use()
        used_after.append(used)
        print(f"after close: torch allocated {(allocated - allocated_before) / MiB:+.1f} MiB, "
              f"device in use {(used - used_before) / MiB:+.1f} MiB")
        # What torch holds: back to before (cuBLAS keeps a workspace per stream it used).
        assert allocated - allocated_before < 100 * MiB
    # The device as a whole: the first engine also grows the CUDA context once (kernel
    # modules loaded, library handles), which is the process's, not the engine's; every
    # later engine gives back all it took.
    assert max(used_after[1:]) - used_after[0] < 100 * MiB
    assert tokens[0] == tokens[1] == tokens[2]

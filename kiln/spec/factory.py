"""A SpeculativeConfig → the engine's Speculator (its proposer built and checked)."""

from __future__ import annotations

import torch

from kiln.compiler.manifest import EngineInfo
from kiln.spec.config import SpeculativeConfig
from kiln.spec.decoder import Speculator
from kiln.spec.ngram import NgramProposer
from kiln.spec.random_proposer import RandomProposer


def build_speculator(
    config: SpeculativeConfig,
    target: EngineInfo,
    *,
    engine_config,  # kiln.config.EngineConfig
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
) -> Speculator:
    if config.method == "ngram":
        proposer = NgramProposer(config.ngram_min, config.ngram_max)
    elif config.method == "random":
        proposer = RandomProposer(target.model_config.vocab_size)
    else:
        from kiln.spec.draft import DraftProposer

        proposer = DraftProposer(
            config.model, target, device=device, dtype=dtype,
            block_size=engine_config.block_size, max_num_seqs=engine_config.max_num_seqs,
            max_num_batched_tokens=engine_config.max_num_batched_tokens,
            max_model_len=max_model_len, enable_cuda_graphs=engine_config.enable_cuda_graphs,
            gpu_memory_utilization=engine_config.gpu_memory_utilization,
            cpu_kv_cache_bytes=engine_config.cpu_kv_cache_bytes,
            verify_hashes=engine_config.verify_hashes,
        )
    speculator = Speculator(config, proposer)
    speculator.max_model_len = max_model_len
    return speculator

"""The offline entry point's step sizes: larger on a GPU, EngineConfig's on the CPU, and
never over what the user set."""

from __future__ import annotations

import torch

from kiln.config import EngineConfig
from kiln.entrypoints import OFFLINE_GPU_DEFAULTS, offline_defaults


def test_cpu_keeps_the_engine_config_defaults():
    assert offline_defaults({"device": "cpu"}) == {"device": "cpu"}
    config = EngineConfig(**offline_defaults({"device": "cpu"}))
    assert config.max_num_seqs == EngineConfig().max_num_seqs


def test_gpu_fills_in_the_offline_step_sizes_unless_set(monkeypatch):
    monkeypatch.setattr("kiln.runtime.engine.resolve_device", lambda name: torch.device("cuda"))
    assert offline_defaults({}) == OFFLINE_GPU_DEFAULTS
    knobs = offline_defaults({"max_num_seqs": 64, "block_size": 32})
    assert knobs == {"max_num_seqs": 64, "block_size": 32,
                     "max_num_batched_tokens": OFFLINE_GPU_DEFAULTS["max_num_batched_tokens"]}
    # Larger than a server's: that is the point of them.
    assert OFFLINE_GPU_DEFAULTS["max_num_seqs"] > EngineConfig().max_num_seqs
    assert OFFLINE_GPU_DEFAULTS["max_num_batched_tokens"] > EngineConfig().max_num_batched_tokens

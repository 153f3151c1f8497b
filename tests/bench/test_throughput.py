"""The offline throughput bench's two runs on a tiny engine: every request produces its
output length, and the figures it reports are there and consistent."""

from __future__ import annotations

import pytest

from kiln.bench.datasets import synthetic_requests
from kiln.bench.throughput import run_batched, run_sequential
from kiln.compiler.manifest import open_engine
from kiln.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from tests.helpers import build_tiny_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    engine_dir = build_tiny_engine(tmp_path_factory.mktemp("throughput"))
    config = EngineConfig(device="cpu", block_size=4, num_kv_blocks=128, max_num_seqs=4)
    return LLMEngine(open_engine(engine_dir), config)


def test_batched_and_sequential_runs_produce_every_token(engine):
    requests = synthetic_requests(6, 5, 3, vocab_size=64, seed=0)
    batched = run_batched(engine, requests)
    assert batched["output_tokens"] == 6 * 3 and batched["prompt_tokens"] == 6 * 5
    assert batched["steps"] >= 3 and batched["preemptions"] == 0
    assert batched["output_tok_s"] == pytest.approx(18 / batched["seconds"])
    assert batched["triton_compiles"] >= 0  # the CPU runs the reference kernels: no Triton
    sequential = run_sequential(engine, requests)
    assert sequential["output_tokens"] == 6 * 3
    assert sequential["requests_s"] == pytest.approx(6 / sequential["seconds"])
    assert not engine.has_unfinished_requests()

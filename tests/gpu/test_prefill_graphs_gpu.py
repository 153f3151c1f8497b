"""Prefill/mixed-step CUDA graphs on the GPU: every bucket's replay gives the eager logits of
the unpadded step (prompt chunks over cached context, fresh prompts and decode rows mixed),
twice; an engine replays them for prefills and mixed steps and generates the same greedy
tokens as one without them; capture reuses the decode graphs' logits buffer and pool."""

from __future__ import annotations

import pytest
import torch

from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig, EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.input_batch import BatchRow
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import run_staggered, save_tiny_hf_model, tiny_llama_config

BLOCK_SIZE = 16
CONFIG = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"prefill-graphs-{request.param}")
    save_tiny_hf_model(CONFIG, directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype=request.param),
                 progress=False)
    return directory / "engine"


def make_engine(engine_dir, **knobs) -> LLMEngine:
    knobs = {"device": "cuda", "block_size": BLOCK_SIZE, "max_num_seqs": 64,
             "num_kv_blocks": 2048, "max_num_batched_tokens": 2048, **knobs}
    return LLMEngine(open_engine(engine_dir), EngineConfig(**knobs))


def step_for(num_tokens: int, num_seqs: int, generator: torch.Generator) -> list[BatchRow]:
    """num_seqs rows of num_tokens tokens in all: decode rows over cached context, a prompt
    chunk over cached context without logits, and the rest a fresh prompt; disjoint blocks."""
    rows, next_block, left = [], 1, num_tokens
    for index in range(num_seqs):
        last = index == num_seqs - 1
        count = left if last else 1 if index % 3 else min(left - (num_seqs - index - 1), 5)
        context = 0 if last else int(torch.randint(1, 200, (), generator=generator))
        blocks = list(range(next_block, next_block + -(-(context + count) // BLOCK_SIZE)))
        next_block += len(blocks)
        tokens = torch.randint(3, 512, (count,), generator=generator).tolist()
        offsets = () if (count > 1 and not last) else (count - 1,)
        rows.append(BatchRow(f"r{index}", tokens, context, blocks, offsets))
        left -= count
    return rows


def test_every_bucket_replays_the_eager_logits_twice(engine_dir):
    with make_engine(engine_dir) as engine:
        runner = engine.runner
        graphs = runner.prefill_graphs
        assert graphs is not None
        for cache in runner.kv_caches:
            cache.normal_()
            cache[:, 0].zero_()
        generator = torch.Generator().manual_seed(0)
        for bucket in graphs.buckets:
            for num_tokens in sorted({bucket.num_tokens, bucket.num_tokens * 3 // 4 + 1}):
                num_seqs = min(bucket.num_seqs, max(2, num_tokens // 8))
                rows = step_for(num_tokens, num_seqs, generator)
                assert graphs.bucket_for(rows) == bucket
                with torch.inference_mode():
                    inputs = runner.buffers.prepare(rows, BLOCK_SIZE)
                    hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches,
                                          inputs.metadata)
                    eager = runner.model.compute_logits(hidden[inputs.logits_indices]).float()
                    padded = runner.buffers.prepare(rows, BLOCK_SIZE, prefill_bucket=bucket)
                    count = len(padded.logits_request_ids)
                    first = graphs.replay(bucket)[:count].float().clone()
                    second = graphs.replay(bucket)[:count].float()
                # bf16: the graph rounds logits to bf16 and attends one-token rows through
                # the prefill kernel where eager splits them to the decode kernel.
                tolerance = 1e-4 if hidden.dtype == torch.float32 else 3e-2
                scale = float(eager.abs().max())
                torch.testing.assert_close(first, eager, rtol=0, atol=tolerance * scale)
                assert torch.equal(first, second)


def test_engine_replays_prefill_graphs_with_the_same_greedy_tokens(engine_dir):
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (int(n),), generator=generator).tolist()
               for n in torch.randint(5, 400, (12,), generator=generator)]

    def run(engine: LLMEngine) -> list[list[int]]:
        # Staggered arrivals: prompts land among decoding requests (mixed steps).
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        return run_staggered(engine, prompts, params, every=4)

    with make_engine(engine_dir) as engine:
        graphed = run(engine)
        graph_steps = engine.runner.prefill_graph_steps
    with make_engine(engine_dir) as engine:
        engine.runner.prefill_graphs = None
        eager = run(engine)
    assert graph_steps >= 10, graph_steps
    if "float32" in str(engine_dir):
        assert graphed == eager
    else:  # bf16 logits in the graphs against float32 eager: near-ties may flip
        same = sum(g == e for g, e in zip(graphed, eager))
        assert same >= len(prompts) - 2, (same, len(prompts))


def test_capture_shares_the_decode_graphs_logits_and_reports_itself(engine_dir):
    with make_engine(engine_dir) as engine:
        report = engine.runner.capture_report
        graphs = engine.runner.prefill_graphs
        assert list(report.prefill_token_sizes) == [b.num_tokens for b in graphs.buckets]
        assert report.prefill_token_sizes[-1] == 1024
        assert graphs._logits is engine.runner.graphs.logits
        # A tiny model's transients: the prefill graphs add little beyond the decode graphs.
        assert 0 <= report.prefill_memory_bytes < 64 * 2**20, report.describe()
        print(report.describe())

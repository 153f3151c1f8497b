"""Start-up on the GPU: weights staged through pinned buffers arrive exactly, every captured
CUDA graph replays the eager logits (twice), capture keeps about one graph's memory, the
uninitialised KV cache is never read where nothing was written, and the phases are timed.

The model is tiny except for its vocabulary (131072, like Llama 3's 128256), so that logits
dominate what capture keeps, as they do for a real model.
"""

from __future__ import annotations

import math

import pytest
import torch

from kiln.compiler.builder import build_engine
from kiln.compiler.loader import _stage_to_device
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig, EngineConfig
from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine
from kiln.runtime.kv_tensors import NULL_BLOCK
from kiln.runtime.input_batch import BatchRow
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import run_to_completion, save_tiny_hf_model, tiny_llama_config

VOCAB = 131072
MAX_NUM_SEQS = 256
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 2048
CONFIG = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("startup")
    save_tiny_hf_model(CONFIG, directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="bfloat16"), progress=False)
    return directory / "engine"


@pytest.fixture(scope="module")
def engine(engine_dir) -> LLMEngine:
    config = EngineConfig(device="cuda", block_size=BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS,
                          num_kv_blocks=NUM_KV_BLOCKS)
    with LLMEngine(open_engine(engine_dir), config) as engine:
        yield engine


def test_staged_copy_to_the_gpu_is_exact():
    """Many pieces through the two pinned buffers (a 1000-byte buffer): a buffer is refilled
    only after the GPU has finished reading it."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(300, 7, generator=generator).to(torch.bfloat16),
        "fp32": torch.randn(1001, generator=generator),
        "int64": torch.arange(333, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
    }
    out = _stage_to_device(tensors.items(), torch.device("cuda"), staging_bytes=1000)
    for name, tensor in tensors.items():
        assert out[name].is_cuda and out[name].dtype == tensor.dtype, name
        assert torch.equal(out[name].cpu(), tensor), name


def test_load_lands_on_the_gpu_in_the_engine_dtype(engine, engine_dir):
    params = list(engine.runner.model.parameters())
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in params)
    assert all(b.is_cuda for b in engine.runner.model.buffers())
    timings = engine.engine_info.timings
    assert timings.verified_bytes > 0 and timings.verify_seconds > 0
    assert timings.weight_bytes == (engine_dir / "rank0.safetensors").stat().st_size
    assert timings.construct_seconds > 0 and timings.weights_seconds > 0
    print(timings.describe())


def decode_batch(num_seqs: int, generator: torch.Generator) -> list[BatchRow]:
    """num_seqs decode requests over random cached context. Each writes its new token into a
    block of its own (1 + i); earlier positions read shared blocks, which nobody writes."""
    batch = []
    for i in range(num_seqs):
        context = int(torch.randint(1, 200, (), generator=generator))
        shared = torch.randint(1 + MAX_NUM_SEQS, NUM_KV_BLOCKS, (context // BLOCK_SIZE,),
                               generator=generator).tolist()
        token = int(torch.randint(0, VOCAB, (), generator=generator))
        batch.append(BatchRow(f"r{i}", [token], context, shared + [1 + i], (0,)))
    return batch


@torch.inference_mode()
def test_every_graph_replays_the_eager_logits(engine):
    """Full and one-short (one padding row) batches at every size. Two replays are bitwise
    equal (same graph, same inputs). Against the eager forward at the unpadded size, cuBLAS
    may pick other kernels and the decode attention another split count, so logits differ by
    bf16 rounding: relative error < 2e-2, as in test_model_gpu.py; a wrong row, position or
    block moves them by O(1)."""
    runner = engine.runner
    graphs = runner.graphs
    assert graphs is not None and graphs.sizes == engine.runner.capture_report.sizes
    generator = torch.Generator().manual_seed(0)
    for cache in runner.kv_caches:
        cache.normal_()
        cache[:, NULL_BLOCK].zero_()
    for size in graphs.sizes:
        # The full size, and one row short (padded) where that is not a captured size itself.
        for num_seqs in sorted({size} | ({size - 1} - set(graphs.sizes) - {0})):
            assert graphs.size_for(num_seqs) == size
            batch = decode_batch(num_seqs, generator)
            runner.buffers.prepare(batch, BLOCK_SIZE, pad_to=size)
            first = graphs.replay(size)
            # In the model dtype, straight from the LM head's GEMM (no float32 copy).
            assert first.shape == (size, VOCAB) and first.dtype == torch.bfloat16
            first = first[:num_seqs].float()
            second = graphs.replay(size)[:num_seqs].float()
            assert torch.equal(first, second), size
            inputs = runner.buffers.prepare(batch, BLOCK_SIZE)
            hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.metadata)
            eager = runner.model.compute_logits(hidden[inputs.logits_indices])
            error = ((first - eager).norm() / eager.norm()).item()
            assert error < 2e-2, (size, num_seqs, error)
    # One shared output buffer: every size's logits are a view of the same memory.
    sizes = graphs.sizes
    assert graphs.replay(sizes[0]).data_ptr() == graphs.replay(sizes[-1]).data_ptr()


def test_capture_keeps_about_one_graph(engine):
    """What capture may keep: the shared (256, V) bf16 logits buffer, which the LM head's GEMM
    writes directly (half a float32 row per row: 0.5x), plus the pool, which holds the largest
    graph's transients: activations of a 256-token batch of a tiny model (< 1 MiB), no logits;
    plus cuBLAS workspaces for the default and the capture stream (up to 32 MiB each on
    Hopper) and 2 MiB allocator rounding: under 1x + 128 MiB in float32 rows. One float32
    output per graph, as at first, would be sum(sizes) rows: 1543 rows of 512 KiB, 771 MiB."""
    report = engine.runner.capture_report
    row = VOCAB * 4
    shared = report.sizes[-1] * row
    print(report.describe())
    assert report.memory_bytes < shared + 128 * 2**20
    assert 3 * shared + 128 * 2**20 < sum(report.sizes) * row
    assert len(report.sizes) == 19 and 0 < report.warmup_seconds < report.seconds


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=4 + i % 9, ignore_eos=True)
              for i in range(len(prompts))]
    return [output.outputs[0].token_ids for output in run_to_completion(engine, prompts, params)]


def test_uninitialised_kv_is_never_read(engine_dir):
    """NaN in every block but the null block changes no token: decode through the graphs
    (padding rows read only the zeroed null block) and prefill both read only what they wrote."""
    config = EngineConfig(device="cuda", block_size=BLOCK_SIZE, max_num_seqs=48, num_kv_blocks=512)
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
        for n in torch.randint(5, 150, (37,), generator=generator)
    ]
    clean = LLMEngine(open_engine(engine_dir, verify_hashes=False), config)
    for cache in clean.runner.kv_caches:
        cache.zero_()
    expected = greedy(clean, prompts)
    clean.close()
    poisoned = LLMEngine(open_engine(engine_dir, verify_hashes=False), config)
    runner = poisoned.runner
    for cache in runner.kv_caches:
        cache[:, NULL_BLOCK + 1 :].fill_(math.nan)
    with torch.inference_mode():
        for size in runner.graphs.sizes:  # all padding rows: only the null block is read
            runner.buffers.prepare([], BLOCK_SIZE, pad_to=size)
            assert runner.graphs.replay(size).isfinite().all(), size
    assert greedy(poisoned, prompts) == expected
    poisoned.close()


def test_kv_cache_sized_by_a_profiling_forward(engine_dir):
    """Without num_kv_blocks the runner measures a worst-case step and fills what is left of
    gpu_memory_utilization; for a tiny model the cap (every sequence at full length) binds,
    and a budget that cannot hold two blocks fails with the numbers in the message."""
    config = EngineConfig(device="cuda", block_size=BLOCK_SIZE, max_num_seqs=64, enable_cuda_graphs=False)
    engine = LLMEngine(open_engine(engine_dir), config)
    profile = engine.runner.memory_profile
    assert profile is not None and profile.activation_peak_bytes > 0
    assert 0 < profile.in_use_bytes < profile.total_bytes
    cap = 64 * -(-engine.max_model_len // BLOCK_SIZE) + 1
    assert engine.runner.num_kv_blocks == engine.scheduler.config.num_kv_blocks == cap
    assert "sized in" in engine.startup.describe()
    engine.close()
    with pytest.raises(KilnError, match="not enough GPU memory for the KV cache"):
        LLMEngine(open_engine(engine_dir), EngineConfig(device="cuda", gpu_memory_utilization=0.01))

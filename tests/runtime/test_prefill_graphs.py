"""The CPU-testable parts of prefill/mixed-step CUDA graphs: the buckets, which step maps to
which bucket, and that a step padded to its bucket computes the same logits (whole model,
reference kernels) and the same attention (the Triton prefill kernel under the interpreter)
as the unpadded step. Capture and replay are in tests/gpu/test_prefill_graphs_gpu.py."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import attention
from kiln.runtime.cuda_graphs import CaptureReport
from kiln.runtime.input_batch import BatchRow, InputBuffers, PrefillBucket
from kiln.runtime.prefill_graphs import (
    PREFILL_GRAPH_MAX_DECODE_CONTEXT,
    PrefillGraphRunner,
    prefill_buckets,
)

BLOCK_SIZE = 4


def test_buckets_span_sixteen_to_the_cap_within_the_buffers():
    buckets = prefill_buckets(max_num_tokens=8192, max_num_seqs=512)
    assert [b.num_tokens for b in buckets] == [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024]
    assert [b.num_seqs for b in buckets] == [16, 32, 64, 128, 192, 256, 256, 256, 256, 256]
    small = prefill_buckets(max_num_tokens=100, max_num_seqs=8)
    assert small == [PrefillBucket(16, 8), PrefillBucket(32, 8), PrefillBucket(64, 8)]


def make_runner(max_num_tokens: int = 64, max_num_seqs: int = 8) -> PrefillGraphRunner:
    buffers = InputBuffers(max_num_tokens, max_num_seqs, max_blocks_per_seq=64, device="cpu")
    return PrefillGraphRunner(torch.nn.Identity(), [], buffers, BLOCK_SIZE,
                              prefill_buckets(max_num_tokens, max_num_seqs))


def row(request_id: str, num_tokens: int, context: int = 0, logits: bool = True) -> BatchRow:
    blocks = list(range(1, 2 + (context + num_tokens) // BLOCK_SIZE))
    return BatchRow(request_id, [7] * num_tokens, context, blocks,
                    (num_tokens - 1,) if logits else ())


def test_bucket_for_picks_the_smallest_that_holds_tokens_sequences_and_logits():
    runner = make_runner()
    assert runner.bucket_for([row("a", 5)]) == PrefillBucket(16, 8)
    assert runner.bucket_for([row("a", 16)]) == PrefillBucket(16, 8)
    assert runner.bucket_for([row("a", 17)]) == PrefillBucket(32, 8)
    assert runner.bucket_for([row("a", 33), row("b", 1, 9)]) == PrefillBucket(64, 8)
    assert runner.bucket_for([row("a", 65)]) is None  # past the largest: eager
    # Nine sequences never fit a bucket of eight.
    assert runner.bucket_for([row(str(i), 1, 3) for i in range(8)] + [row("x", 2)]) is None


def test_long_context_decode_rows_run_eagerly():
    runner = make_runner()
    assert runner.bucket_for([row("a", 4), row("b", 1, PREFILL_GRAPH_MAX_DECODE_CONTEXT - 1)])
    assert runner.bucket_for([row("a", 4), row("b", 1, PREFILL_GRAPH_MAX_DECODE_CONTEXT)]) is None


def test_buckets_outside_the_buffers_are_refused():
    buffers = InputBuffers(32, 4, max_blocks_per_seq=8, device="cpu")
    with pytest.raises(ValueError, match="exceeds the input buffers"):
        PrefillGraphRunner(torch.nn.Identity(), [], buffers, BLOCK_SIZE, [PrefillBucket(64, 4)])
    with pytest.raises(ValueError, match="no prefill buckets"):
        PrefillGraphRunner(torch.nn.Identity(), [], buffers, BLOCK_SIZE, [])


def test_a_step_that_does_not_fit_its_bucket_is_refused():
    buffers = InputBuffers(64, 8, max_blocks_per_seq=64, device="cpu")
    with pytest.raises(ValueError, match="does not fit the prefill bucket"):
        buffers.prepare([row("a", 20)], BLOCK_SIZE, prefill_bucket=PrefillBucket(16, 8))


def test_report_adds_the_prefill_graphs():
    decode = CaptureReport(sizes=[1, 2], seconds=1.0, memory_bytes=100 * 2**20, warmup_seconds=0.5)
    prefill = CaptureReport(sizes=[16, 32], seconds=0.5, memory_bytes=50 * 2**20,
                            warmup_seconds=0.25)
    both = decode.with_prefill(prefill)
    assert (both.seconds, both.memory_bytes, both.warmup_seconds) == (1.5, 150 * 2**20, 0.75)
    assert both.describe() == (
        "captured 2 CUDA graphs (batch sizes 1…2) in 1.5 s (warm-up 0.8 s) using 150 MiB, "
        "of which 2 prefill graphs (tokens 16…32) in 0.5 s using 50 MiB"
    )


def test_padding_layout():
    buffers = InputBuffers(64, 8, max_blocks_per_seq=64, device="cpu")
    rows = [row("d", 1, 9), row("p", 6, 4)]
    inputs = buffers.prepare(rows, BLOCK_SIZE, prefill_bucket=PrefillBucket(16, 8))
    metadata = inputs.metadata
    assert inputs.input_ids.shape == (16,) and inputs.logits_indices.shape == (8,)
    assert metadata.slot_mapping[7:].eq(-1).all() and metadata.slot_mapping[:7].ge(0).all()
    assert metadata.query_start_loc.tolist() == [0, 1, 7, 7, 7, 7, 7, 7, 7]
    assert metadata.seq_lens.tolist() == [10, 10, 0, 0, 0, 0, 0, 0]
    assert metadata.block_tables.shape[0] == 8 and metadata.block_tables[2:].eq(0).all()
    assert inputs.logits_indices[:2].tolist() == [0, 6]
    # Every row takes the prefill kernel, one-token rows too.
    assert metadata.max_query_len > 1 and metadata.num_decode_seqs == 0
    assert inputs.logits_request_ids == ["d", "p"]


def test_an_empty_step_pads_to_all_padding():
    """What capture prepares: no real rows, every token and sequence padding."""
    buffers = InputBuffers(64, 8, max_blocks_per_seq=64, device="cpu")
    inputs = buffers.prepare([], BLOCK_SIZE, prefill_bucket=PrefillBucket(32, 8))
    assert inputs.input_ids.shape == (32,) and inputs.metadata.slot_mapping.eq(-1).all()
    assert inputs.metadata.query_start_loc.eq(0).all() and inputs.metadata.seq_lens.eq(0).all()
    assert inputs.metadata.num_decode_seqs == 0 and inputs.logits_request_ids == []


def _mixed_step_rows() -> list[BatchRow]:
    """A decode row over 9 cached tokens, a prompt chunk after 5 cached tokens (no logits:
    not its last chunk), and a fresh prompt of 7 tokens, on disjoint blocks."""
    return [
        BatchRow("decode", [11], 9, [1, 2, 3], (0,)),
        BatchRow("chunk", [12, 13, 14, 15], 5, [4, 5, 6], ()),
        BatchRow("fresh", [21, 22, 23, 24, 25, 26, 27], 0, [7, 8], (6,)),
    ]


def test_padded_attention_matches_unpadded_through_the_triton_prefill_kernel():
    """The Triton prefill kernel (interpreter) over a padded bucket: padding sequences and
    tokens do not disturb the real rows, which match the reference on the unpadded step."""
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    kv_cache = torch.randn(2, 10, BLOCK_SIZE, num_kv_heads, head_dim)
    rows = _mixed_step_rows()
    plain = InputBuffers(64, 8, 16, "cpu").prepare(rows, BLOCK_SIZE)
    padded = InputBuffers(64, 8, 16, "cpu").prepare(rows, BLOCK_SIZE,
                                                   prefill_bucket=PrefillBucket(32, 8))
    real = plain.num_tokens
    query = torch.randn(32, num_heads, head_dim)
    expected = attention.paged_attention_reference(
        query[:real], kv_cache, plain.metadata.block_tables,
        plain.metadata.query_start_loc_host, plain.metadata.seq_lens_host, 0.25)
    metadata = padded.metadata
    out = attention.paged_prefill_attention(query, kv_cache, metadata.block_tables,
                                            metadata.query_start_loc, metadata.seq_lens, 0.25)
    torch.testing.assert_close(out[:real], expected, rtol=1e-4, atol=1e-4)


def test_padded_forward_gives_the_unpadded_logits(tmp_path):
    """The whole tiny model (reference kernels) over a mixed step padded to its bucket: the
    real logits rows equal the unpadded step's, and the padding wrote no KV."""
    from tests.helpers import build_tiny_engine, make_cpu_engine

    engine = make_cpu_engine(build_tiny_engine(tmp_path))
    runner = engine.runner
    model, kv_caches = runner.model, runner.kv_caches
    for cache in kv_caches:
        cache.normal_()
    before = [cache.clone() for cache in kv_caches]
    rows = _mixed_step_rows()
    buffers = InputBuffers(64, 8, 16, "cpu")
    with torch.inference_mode():
        plain = buffers.prepare(rows, BLOCK_SIZE)
        hidden = model(plain.input_ids, plain.positions, kv_caches, plain.metadata)
        expected = model.compute_logits(hidden[plain.logits_indices])
        after_plain = [cache.clone() for cache in kv_caches]
        for cache, original in zip(kv_caches, before):
            cache.copy_(original)
        padded = buffers.prepare(rows, BLOCK_SIZE, prefill_bucket=PrefillBucket(32, 8))
        hidden = model(padded.input_ids, padded.positions, kv_caches, padded.metadata)
        logits = model.compute_logits(hidden[padded.logits_indices])
    assert logits.shape[0] == 8
    torch.testing.assert_close(logits[:2], expected, rtol=1e-5, atol=1e-5)
    for cache, reference in zip(kv_caches, after_plain):
        assert torch.equal(cache, reference)  # padding tokens wrote nowhere
    engine.close()


class EagerStandIn(PrefillGraphRunner):
    """The runner's prefill-graph path on the CPU: `replay` runs the padded forward eagerly
    on the inputs InputBuffers last prepared (a CUDA graph reads the same buffers)."""

    def __init__(self, runner) -> None:
        super().__init__(runner.model, runner.kv_caches, runner.buffers, runner.block_size,
                         prefill_buckets(runner.buffers.max_num_tokens, runner.buffers.max_num_seqs))
        self.replays: list[PrefillBucket] = []
        prepare = runner.buffers.prepare

        def remembering_prepare(*args, **kwargs):
            self.last_inputs = prepare(*args, **kwargs)
            return self.last_inputs

        runner.buffers.prepare = remembering_prepare

    def replay(self, bucket: PrefillBucket) -> torch.Tensor:
        self.replays.append(bucket)
        assert self.last_inputs.input_ids.shape[0] == bucket.num_tokens
        with torch.inference_mode():
            return self._forward(self.last_inputs)[: bucket.num_seqs]


@pytest.mark.parametrize("overlap", [False, True])
def test_the_runner_path_through_prefill_buckets_generates_the_same_tokens(tmp_path, overlap):
    """Staggered prompts among decoding requests (prefills, chunks and mixed steps, with
    overlap: placeholders filled into the padded inputs) give the same tokens through the
    bucket path as through plain eager steps."""
    from kiln.runtime.sampling_params import SamplingParams
    from tests.helpers import build_tiny_engine, make_cpu_engine, run_staggered

    engine_dir = build_tiny_engine(tmp_path)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (int(n),), generator=generator).tolist()
               for n in torch.randint(3, 40, (6,), generator=generator)]

    def run(engine) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        return run_staggered(engine, prompts, params, every=2)

    knobs = {"overlap_scheduling": overlap, "max_num_batched_tokens": 48, "max_num_seqs": 8}
    plain_engine = make_cpu_engine(engine_dir, **knobs)
    expected = run(plain_engine)
    plain_engine.close()
    engine = make_cpu_engine(engine_dir, **knobs)
    engine.runner.prefill_graphs = stand_in = EagerStandIn(engine.runner)
    got = run(engine)
    assert got == expected
    assert len(stand_in.replays) == engine.runner.prefill_graph_steps >= len(prompts)
    assert {b.num_tokens for b in stand_in.replays} >= {16, 32}  # mixed sizes were padded
    engine.close()

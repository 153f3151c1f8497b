"""The CPU-testable parts of CUDA-graph capture: which batch sizes are captured and how a
decode batch maps onto them. Capture and replay themselves are in tests/gpu/test_startup_gpu.py."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime.cuda_graphs import CaptureReport, CudaGraphRunner, capture_sizes
from kiln.runtime.input_batch import InputBuffers

MAX_NUM_SEQS = [1, 2, 3, 7, 8, 9, 16, 17, 63, 64, 65, 100, 128, 129, 200, 256, 257, 384, 512, 1000, 1024]


def padded(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


@pytest.mark.parametrize("max_num_seqs", MAX_NUM_SEQS)
def test_sizes_sorted_unique_and_span_one_to_max(max_num_seqs):
    sizes = capture_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes))
    assert sizes[0] == 1 and sizes[-1] == max_num_seqs


@pytest.mark.parametrize("max_num_seqs", MAX_NUM_SEQS)
def test_padding_waste_is_bounded(max_num_seqs):
    """Every batch has a graph; small batches (weight-bound decode: padding costs almost
    nothing) pad to under twice their size, batches of 64 and more waste under 20 %."""
    sizes = capture_sizes(max_num_seqs)
    for n in range(1, max_num_seqs + 1):
        size = padded(sizes, n)
        assert size < 2 * n, (n, size)
        if n >= 64:
            assert (size - n) / size < 0.20, (n, size)


def test_far_fewer_sizes_than_every_eight():
    assert capture_sizes(256) == [
        1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
    ]
    assert len(capture_sizes(512)) == 23
    # Growth is logarithmic, not linear, in max_num_seqs.
    assert len(capture_sizes(4096)) < 40


def test_invalid_max_num_seqs():
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)


def make_runner(sizes: list[int], max_num_seqs: int = 32) -> CudaGraphRunner:
    buffers = InputBuffers(max_num_tokens=64, max_num_seqs=max_num_seqs, max_blocks_per_seq=4,
                           device="cpu")
    return CudaGraphRunner(torch.nn.Identity(), [], buffers, block_size=4, sizes=sizes)


def test_size_for_picks_the_smallest_size_that_fits():
    runner = make_runner(capture_sizes(32))
    assert [runner.size_for(n) for n in (1, 2, 3, 5, 9, 16, 17, 25, 32)] == [1, 2, 4, 8, 16, 16, 24, 32, 32]
    assert runner.size_for(33) is None  # larger than any graph: runs eagerly


@pytest.mark.parametrize("sizes", [[], [0, 4], [4, 64]])
def test_sizes_outside_the_input_buffers_are_refused(sizes):
    with pytest.raises(ValueError, match="capture sizes"):
        make_runner(sizes, max_num_seqs=32)


def test_report_describes_itself():
    report = CaptureReport(sizes=[1, 2, 4], seconds=2.0, memory_bytes=300 * 2**20, warmup_seconds=0.5)
    assert report.describe() == (
        "captured 3 CUDA graphs (batch sizes 1…4) in 2.0 s (warm-up 0.5 s) using 300 MiB"
    )


def test_padding_rows_read_only_the_null_block():
    """The contract the graphs and the uninitialised KV cache rely on (kv_tensors.py): a
    padding row writes nowhere and attends over one token of the zeroed null block 0."""
    from kiln.runtime.input_batch import BatchRow

    buffers = InputBuffers(max_num_tokens=64, max_num_seqs=8, max_blocks_per_seq=4, device="cpu")
    batch = [BatchRow(f"r{i}", [5], 5 + i, [3 + i, 9 - i], (0,)) for i in range(3)]
    inputs = buffers.prepare(batch, 4, pad_to=8)
    metadata = inputs.metadata
    assert metadata.block_tables.shape[0] == 8
    assert metadata.block_tables[3:].eq(0).all(), metadata.block_tables
    assert metadata.seq_lens[3:].eq(1).all() and metadata.slot_mapping[3:].eq(-1).all()
    assert metadata.block_tables[:3, :2].tolist() == [[3, 9], [4, 8], [5, 7]]

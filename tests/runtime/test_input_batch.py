"""InputBuffers.prepare: the vectorised batch against a per-row reference.

prepare builds every tensor for the whole batch at once (numpy over flat arrays); the
reference below walks the requests one token at a time, the way the module docstring
describes the layout. Random mixes of prefill chunks, decode rows, multi-token rows with
logits at any of their tokens, placeholder tokens and graph padding go through one set of
buffers in a row, so data a bigger earlier batch left behind cannot hide either.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.input_batch import BatchRow, InputBuffers, prepare_inputs

BLOCK_SIZE = 4
MAX_NUM_TOKENS = 96
MAX_NUM_SEQS = 12
MAX_BLOCKS_PER_SEQ = 16
PLACEHOLDER = -1  # a token the previous step is still sampling


@dataclass
class Expected:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_rows: list[list[int]]  # the block ids each row of the block table must start with
    logits_indices: list[int]
    logits_request_ids: list[str]


def make_row(request_id: str, token_ids: list[int], num_computed_tokens: int,
             block_ids: list[int], sample: bool) -> BatchRow:
    """A row that samples at its last token (or not at all)."""
    offsets = (len(token_ids) - 1,) if sample else ()
    return BatchRow(request_id, token_ids, num_computed_tokens, block_ids, offsets)


def reference(scheduled: list[BatchRow], block_size: int, pad_to: int | None) -> Expected:
    """One request and one token at a time."""
    expected = Expected([], [], [], [0], [], [], [], [])
    for request in scheduled:
        for offset, token_id in enumerate(request.token_ids):
            position = request.num_computed_tokens + offset
            block_id = request.block_ids[position // block_size]
            expected.input_ids.append(token_id)
            expected.positions.append(position)
            expected.slot_mapping.append(block_id * block_size + position % block_size)
        expected.query_start_loc.append(len(expected.input_ids))
        expected.seq_lens.append(request.num_computed_tokens + len(request.token_ids))
        expected.block_rows.append(list(request.block_ids))
        row_start = len(expected.input_ids) - len(request.token_ids)
        for offset in request.logits_offsets:
            expected.logits_indices.append(row_start + offset)
            expected.logits_request_ids.append(request.request_id)
    # Graph padding: one token that writes nowhere, attending over the null block 0.
    for _ in range(len(scheduled), pad_to or len(scheduled)):
        expected.input_ids.append(0)
        expected.positions.append(0)
        expected.slot_mapping.append(-1)
        expected.query_start_loc.append(len(expected.input_ids))
        expected.seq_lens.append(1)
        expected.block_rows.append([0])
        expected.logits_indices.append(len(expected.input_ids) - 1)
    return expected


def check(inputs, expected: Expected, num_seqs: int, num_tokens: int) -> None:
    metadata = inputs.metadata
    for tensor, values, dtype in [
        (inputs.input_ids, expected.input_ids, torch.int64),
        (inputs.positions, expected.positions, torch.int64),
        (inputs.logits_indices, expected.logits_indices, torch.int64),
        (metadata.slot_mapping, expected.slot_mapping, torch.int64),
        (metadata.query_start_loc, expected.query_start_loc, torch.int32),
        (metadata.seq_lens, expected.seq_lens, torch.int32),
    ]:
        assert tensor.dtype == dtype
        assert tensor.tolist() == values
    assert metadata.query_start_loc_host == expected.query_start_loc
    assert metadata.seq_lens_host == expected.seq_lens
    query_lens = [b - a for a, b in zip(expected.query_start_loc, expected.query_start_loc[1:])]
    assert metadata.max_query_len == max(query_lens, default=0)
    assert metadata.max_seq_len == max(expected.seq_lens, default=0)
    # A mixed batch's leading one-token rows are its decode rows; the rest's starts rebased.
    num_decode = 0
    if max(query_lens, default=0) > 1:
        num_decode = next(i for i, q in enumerate(query_lens) if q != 1)
    assert metadata.num_decode_seqs == num_decode
    if num_decode:
        rebased = [start - num_decode for start in expected.query_start_loc[num_decode:]]
        assert metadata.prefill_query_start_loc.tolist() == rebased
    else:
        assert metadata.prefill_query_start_loc is None
    # Columns past a row's own blocks are never read (seq_lens bounds them): only each
    # row's prefix is specified, and the table must be at least as wide as the widest row.
    block_tables = metadata.block_tables
    assert block_tables.dtype == torch.int32
    assert block_tables.shape[0] == len(expected.block_rows)
    for row, block_ids in enumerate(expected.block_rows):
        assert block_tables[row, : len(block_ids)].tolist() == block_ids
    assert inputs.logits_request_ids == expected.logits_request_ids
    assert (inputs.num_seqs, inputs.num_tokens) == (num_seqs, num_tokens)


@st.composite
def batches(draw, block_size: int) -> tuple[list[BatchRow], int | None]:
    """A batch that fits the buffers: decode-only (maybe padded for a graph) or a mix of
    prefill chunks and decode rows."""
    decode_only = draw(st.booleans())
    num_seqs = draw(st.integers(0 if decode_only else 1, MAX_NUM_SEQS))
    scheduled = []
    budget = MAX_NUM_TOKENS
    for index in range(num_seqs):
        # Leave at least one token of the budget for each row still to come, and fit the
        # row's tokens into its blocks.
        most = min(20, budget - (num_seqs - index - 1), MAX_BLOCKS_PER_SEQ * block_size)
        num_tokens = 1 if decode_only else draw(st.integers(1, most))
        budget -= num_tokens
        max_computed = MAX_BLOCKS_PER_SEQ * block_size - num_tokens
        num_computed = draw(st.integers(0, max_computed))
        needed_blocks = -(-(num_computed + num_tokens) // block_size)
        num_blocks = draw(st.integers(needed_blocks, MAX_BLOCKS_PER_SEQ))  # spare blocks too
        block_ids = draw(
            st.lists(st.integers(1, 10_000), min_size=num_blocks, max_size=num_blocks, unique=True)
        )
        token_ids = draw(
            st.lists(
                st.one_of(st.just(PLACEHOLDER), st.integers(0, 50_000)),
                min_size=num_tokens,
                max_size=num_tokens,
            )
        )
        if decode_only:
            offsets = (0,)
        else:  # none, the last token (a prompt's end), or any subset (verify rows)
            offsets = draw(st.one_of(
                st.just(()), st.just((num_tokens - 1,)),
                st.sets(st.integers(0, num_tokens - 1)).map(lambda o: tuple(sorted(o))),
            ))
        scheduled.append(BatchRow(f"r{index}", token_ids, num_computed, block_ids, offsets))
    pad_to = None
    if decode_only and draw(st.booleans()):
        pad_to = draw(st.integers(max(num_seqs, 1), MAX_NUM_SEQS))
    return scheduled, pad_to


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([1, 4, 16]).flatmap(
        lambda block_size: st.tuples(
            st.just(block_size), st.lists(batches(block_size), min_size=1, max_size=4)
        )
    )
)
def test_prepare_matches_per_row_reference(block_size_and_steps) -> None:
    block_size, steps = block_size_and_steps
    buffers = InputBuffers(MAX_NUM_TOKENS, MAX_NUM_SEQS, MAX_BLOCKS_PER_SEQ, "cpu")
    prepared = []
    for scheduled, pad_to in steps:
        prepared.append((buffers.prepare(scheduled, block_size, pad_to=pad_to), scheduled, pad_to))
    # Checked after all steps: on the CPU each step's tensors are its own, not views of the
    # staging buffers that later steps refill.
    for inputs, scheduled, pad_to in prepared:
        num_tokens = sum(len(r.token_ids) for r in scheduled)
        check(inputs, reference(scheduled, block_size, pad_to), len(scheduled), num_tokens)


def test_placeholder_tokens_pass_through() -> None:
    """-1 is copied as given; positions and slots come from num_computed_tokens."""
    scheduled = [
        make_row("decode", [PLACEHOLDER], 5, [7, 3], True),
        make_row("chunk", [11, 12, PLACEHOLDER], 0, [9], True),
    ]
    inputs = prepare_inputs(scheduled, BLOCK_SIZE)
    assert inputs.input_ids.tolist() == [PLACEHOLDER, 11, 12, PLACEHOLDER]
    assert inputs.positions.tolist() == [5, 0, 1, 2]
    assert inputs.metadata.slot_mapping.tolist() == [3 * 4 + 1, 9 * 4, 9 * 4 + 1, 9 * 4 + 2]


def test_padding_rows_write_nowhere_and_read_the_null_block() -> None:
    buffers = InputBuffers(MAX_NUM_TOKENS, MAX_NUM_SEQS, MAX_BLOCKS_PER_SEQ, "cpu")
    wide = [
        make_row(f"w{i}", [1, 2, 3], 40, list(range(20 + i * 11, 31 + i * 11)), True)
        for i in range(4)
    ]
    buffers.prepare(wide, BLOCK_SIZE)  # leaves non-zero data in every staging buffer
    inputs = buffers.prepare([make_row("d", [5], 2, [8], True)], BLOCK_SIZE, pad_to=3)
    assert inputs.input_ids.tolist() == [5, 0, 0]
    assert inputs.metadata.slot_mapping.tolist() == [8 * 4 + 2, -1, -1]
    assert inputs.metadata.seq_lens_host == [3, 1, 1]
    assert inputs.metadata.block_tables.tolist() == [[8], [0], [0]]
    assert inputs.logits_indices.tolist() == [0, 1, 2]
    assert (inputs.num_seqs, inputs.num_tokens) == (1, 1)


def test_empty_batch_padded_for_graph_capture() -> None:
    buffers = InputBuffers(MAX_NUM_TOKENS, MAX_NUM_SEQS, MAX_BLOCKS_PER_SEQ, "cpu")
    inputs = buffers.prepare([], BLOCK_SIZE, pad_to=4)
    assert inputs.metadata.query_start_loc_host == [0, 1, 2, 3, 4]
    assert inputs.metadata.block_tables.tolist() == [[0]] * 4
    assert (inputs.metadata.max_query_len, inputs.metadata.max_seq_len) == (1, 1)
    assert inputs.logits_request_ids == []


@pytest.mark.parametrize(
    ("scheduled", "pad_to", "message"),
    [
        (
            [
                make_row("ok", [1], 0, [1], True),
                make_row("short", [1, 2, 3], 6, [1, 2], True),
            ],
            None,
            "request short: 2 blocks cannot hold 9 tokens at block size 4",
        ),
        (
            [make_row("long", [1], 0, list(range(1, MAX_BLOCKS_PER_SEQ + 2)), True)],
            None,
            f"request long has {MAX_BLOCKS_PER_SEQ + 1} blocks, more than the "
            f"{MAX_BLOCKS_PER_SEQ} a sequence may have",
        ),
        (
            [make_row("big", list(range(MAX_NUM_TOKENS + 1)), 0, list(range(1, 30)), True)],
            None,
            f"batch of 1 sequences / {MAX_NUM_TOKENS + 1} tokens exceeds the input buffers",
        ),
        (
            [make_row("chunk", [1, 2], 0, [1], True)],
            4,
            "only decode-only batches",
        ),
        (
            [make_row("unsampled", [1], 0, [1], False)],
            4,
            "only decode-only batches",
        ),
        (
            [BatchRow("verify", [1, 2], 0, [1], (0, 2))],
            None,
            "request verify: logits offset 2 is outside its row of 2 tokens",
        ),
    ],
)
def test_bad_batches_are_rejected_with_the_reason(scheduled, pad_to, message) -> None:
    buffers = InputBuffers(MAX_NUM_TOKENS, MAX_NUM_SEQS, MAX_BLOCKS_PER_SEQ, "cpu")
    with pytest.raises(ValueError, match=message):
        buffers.prepare(scheduled, BLOCK_SIZE, pad_to=pad_to)


def test_runner_orders_a_mixed_step_decode_rows_first() -> None:
    """The runner hands prepare() a mixed step's one-token rows first, each group in scheduler
    order; decode-only and prefill-only steps keep their order."""
    from kiln.runtime.model_runner import _decode_rows_first

    chunk = make_row("chunk", [1, 2, 3], 0, [1], False)
    decode_a = make_row("a", [PLACEHOLDER], 4, [2, 6], True)
    prompt = make_row("prompt", [5, 6], 0, [3], True)
    decode_b = make_row("b", [7], 9, [4, 5, 8], True)
    ordered = _decode_rows_first([chunk, decode_a, prompt, decode_b])
    assert [r.request_id for r in ordered] == ["a", "b", "chunk", "prompt"]
    inputs = prepare_inputs(ordered, BLOCK_SIZE)
    assert inputs.metadata.num_decode_seqs == 2
    assert inputs.metadata.prefill_query_start_loc.tolist() == [0, 3, 5]
    assert inputs.logits_request_ids == ["a", "b", "prompt"]
    decode_only = [decode_b, decode_a]
    assert _decode_rows_first(decode_only) is decode_only
    prefill_only = [prompt, chunk]
    assert _decode_rows_first(prefill_only) is prefill_only

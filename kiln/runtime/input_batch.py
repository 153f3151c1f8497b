"""A step's batch rows → the flat ragged tensors one forward pass takes.

    request A: 5 prompt tokens, 0 cached      request B: 1 decode token, 7 cached
    input_ids       [a0 a1 a2 a3 a4 | b7]
    positions       [ 0  1  2  3  4 |  7]
    query_start_loc [0, 5, 6]         seq_lens [5, 8]
    slot_mapping    [slot(A,0..4)   | slot(B,7)]   slot = block_table[pos // bs] * bs + pos % bs
    logits_indices  [4, 5]            (each row's logits_offsets, here its last token)

A row asks for logits at any of its tokens (`logits_offsets`): a decode row and the last
chunk of a prompt at their last token, a row verifying k speculative tokens at its last
k + 1; the sampler gets one logits row per offset, in row order.

`InputBuffers` keeps these tensors allocated for the engine's lifetime: host staging copies
(pinned on CUDA) are filled with numpy, then copied to the device without blocking the host.
The device tensors never move, so CUDA graphs captured on views of them replay with each
step's inputs. A decode batch padded for a graph gets padding rows that write nowhere
(slot -1) and attend over one token of the reserved null block 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from kiln.layers.attention import AttentionMetadata


class BatchRow(NamedTuple):
    """One request's row of a step's flat batch (the runner builds it from the step message
    and its own copy of the request). A NamedTuple: one is built per row per step."""

    request_id: str
    # The row's tokens; PLACEHOLDER_TOKEN_ID (-1) for tokens still being sampled.
    token_ids: list[int]
    # Position of token_ids[0]: tokens of the request already in the KV cache.
    num_computed_tokens: int
    # The request's whole block table (physical block ids), covering at least
    # num_computed_tokens + len(token_ids) tokens.
    block_ids: list[int]
    # Offsets into token_ids whose logits are sampled, ascending.
    logits_offsets: tuple[int, ...] = ()


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    metadata: AttentionMetadata
    # (L,) int64: flat index of each logits row's token (every row's logits_offsets).
    logits_indices: torch.Tensor
    # (L,) the request of each logits row.
    logits_request_ids: list[str]
    num_tokens: int  # real (unpadded) tokens
    num_seqs: int  # real (unpadded) sequences


class InputBuffers:
    def __init__(
        self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device | str
    ) -> None:
        self.device = torch.device(device)
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        on_cuda = self.device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=on_cuda)
            return host, host.numpy(), torch.zeros(shape, dtype=dtype, device=self.device)

        self._input_ids = pair(max_num_tokens, torch.int64)
        self._positions = pair(max_num_tokens, torch.int64)
        self._slot_mapping = pair(max_num_tokens, torch.int64)
        self._query_start_loc = pair(max_num_seqs + 1, torch.int32)
        self._prefill_query_start_loc = pair(max_num_seqs + 1, torch.int32)
        self._seq_lens = pair(max_num_seqs, torch.int32)
        # A row verifying speculative tokens has several logits rows: up to one per token.
        self._logits_indices = pair(max(max_num_tokens, max_num_seqs), torch.int64)
        self._block_tables = torch.zeros(
            (max_num_seqs, max_blocks_per_seq), dtype=torch.int32, device=self.device
        )
        # The host side of the block table is packed at the batch's own width (rows of
        # `widest` columns, back to back), so its copy is one contiguous pinned transfer;
        # a strided host slice would make torch stage it through pageable memory first.
        block_tables_host = torch.zeros(
            max_num_seqs * max_blocks_per_seq, dtype=torch.int32, pin_memory=on_cuda
        )
        self._block_tables_host = block_tables_host, block_tables_host.numpy()
        # Recorded after each step's host→device copies. The staging buffers are refilled
        # every step; when steps overlap (the host prepares step N+1 while the device runs
        # step N) the previous copies may still be queued, so prepare waits for them first.
        # In a step-by-step loop they finished long ago and the wait costs nothing.
        self._copies_done = torch.cuda.Event() if on_cuda else None

    def _copy(self, buffers, count) -> torch.Tensor:
        host, host_array, device = buffers
        if self.device.type == "cpu":
            return torch.from_numpy(host_array[:count].copy())  # cheaper than a torch clone
        device[:count].copy_(host[:count], non_blocking=True)
        return device[:count]

    def _copy_block_tables(self, num_seqs: int, widest: int) -> torch.Tensor:
        host, host_array = self._block_tables_host
        if self.device.type == "cpu":
            table = host_array[: num_seqs * widest].reshape(num_seqs, widest)
            return torch.from_numpy(table.copy())
        table = host[: num_seqs * widest].view(num_seqs, widest)
        self._block_tables[:num_seqs, :widest].copy_(table, non_blocking=True)
        # Full rows: the view a captured graph reads; columns past `widest` are stale but
        # never read (seq_lens bounds every lookup).
        return self._block_tables[:num_seqs]

    def prepare(
        self, scheduled: list[BatchRow], block_size: int, pad_to: int | None = None,
        prefill_bucket: "PrefillBucket | None" = None,
    ) -> ModelInputs:
        """Fill the buffers for this batch. With pad_to, the batch must be decode-only (one
        token per request) and is padded to pad_to sequences for a captured graph. With
        prefill_bucket (any mix of rows, one logits row each at most per bucket sequence),
        it is padded to the bucket's tokens, sequences and logits rows for a captured
        prefill graph (prefill_graphs.py): padding tokens belong to no sequence, padding
        sequences have no tokens, and every row goes through the prefill kernel.

        Token ids are copied as given, including the placeholder -1 that overlapped steps
        use for a token the previous step is still sampling: positions and slots come from
        num_computed_tokens, never from the ids.
        """
        # One pass over the requests gathers plain lists; everything per token below is
        # numpy over the whole batch (a decode batch is hundreds of one-token rows, where
        # per-row numpy calls cost more than the work they do).
        token_ids: list[int] = []
        block_ids: list[int] = []
        num_scheduled: list[int] = []
        num_computed: list[int] = []
        num_blocks: list[int] = []
        logits_rows: list[int] = []  # per logits row: its batch row
        logits_offsets: list[int] = []  # and its offset in that row
        logits_ids: list[str] = []
        for row, request in enumerate(scheduled):
            token_ids += request.token_ids
            block_ids += request.block_ids
            num_scheduled.append(len(request.token_ids))
            num_computed.append(request.num_computed_tokens)
            num_blocks.append(len(request.block_ids))
            offsets = request.logits_offsets
            if len(offsets) == 1:
                logits_rows.append(row)
                logits_offsets.append(offsets[0])
                logits_ids.append(request.request_id)
            elif offsets:
                logits_rows += [row] * len(offsets)
                logits_offsets += offsets
                logits_ids += [request.request_id] * len(offsets)
        num_seqs = len(scheduled)
        num_tokens = len(token_ids)
        padded_seqs = pad_to or num_seqs
        padded_tokens = num_tokens + (padded_seqs - num_seqs)
        if prefill_bucket is not None:
            if pad_to is not None:
                raise ValueError("pad_to and prefill_bucket are exclusive")
            if not prefill_bucket.fits(num_tokens, num_seqs, len(logits_rows)):
                raise ValueError(
                    f"batch of {num_tokens} tokens / {num_seqs} sequences / "
                    f"{len(logits_rows)} logits rows does not fit the prefill bucket "
                    f"{prefill_bucket}"
                )
            padded_seqs, padded_tokens = prefill_bucket.num_seqs, prefill_bucket.num_tokens
        if padded_seqs > self.max_num_seqs or padded_tokens > self.max_num_tokens:
            raise ValueError(
                f"batch of {num_seqs} sequences / {num_tokens} tokens exceeds the input buffers "
                f"({self.max_num_seqs} / {self.max_num_tokens})"
            )
        if self._copies_done is not None:
            self._copies_done.synchronize()

        query_lens = int64_array(num_scheduled)  # (S,)
        seq_lens = int64_array(num_computed) + query_lens  # (S,)
        block_counts = int64_array(num_blocks)  # (S,)
        self._check_blocks(scheduled, seq_lens, block_counts, block_size)

        query_start_loc = self._query_start_loc[1]
        query_start_loc[0] = 0
        query_start_loc[1 : num_seqs + 1] = np.cumsum(query_lens)
        token_rows = np.repeat(np.arange(num_seqs), query_lens)  # (T,) row of each token
        # Position of each token: its row's first position plus its offset in the row.
        first_positions = seq_lens - query_lens - query_start_loc[:num_seqs]  # (S,)
        positions = np.arange(num_tokens) + first_positions[token_rows]  # (T,)
        # Block ids of all rows back to back; a row's blocks start after the earlier rows'.
        flat_block_ids = int64_array(block_ids)  # (sum of block_counts,)
        block_starts = np.cumsum(block_counts) - block_counts  # (S,)
        slot_blocks = flat_block_ids[block_starts[token_rows] + positions // block_size]  # (T,)

        self._input_ids[1][:num_tokens] = int64_array(token_ids)
        self._positions[1][:num_tokens] = positions
        self._slot_mapping[1][:num_tokens] = slot_blocks * block_size + positions % block_size
        self._seq_lens[1][:num_seqs] = seq_lens
        num_sampled = len(logits_rows)
        rows, offsets = int64_array(logits_rows), int64_array(logits_offsets)  # (L,) each
        outside = (offsets < 0) | (offsets >= query_lens[rows])  # (L,)
        if outside.any():
            bad = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"request {logits_ids[bad]}: logits offset {offsets[bad]} is outside its row of "
                f"{query_lens[rows[bad]]} tokens"
            )
        self._logits_indices[1][:num_sampled] = query_start_loc[rows] + offsets

        widest = max(1, max(num_blocks, default=1))
        block_table = self._block_tables_host[1][: padded_seqs * widest].reshape(
            padded_seqs, widest
        )
        block_table[:] = 0  # unused columns (and padding rows: the null block 0) read as 0
        columns = np.arange(widest)
        # Boolean-mask assignment fills in row-major order: row by row, each row's blocks.
        block_table[:num_seqs][columns < block_counts[:, None]] = flat_block_ids

        max_query_len = max(num_scheduled, default=0)
        if prefill_bucket is not None:
            self._pad_prefill(num_tokens, num_seqs, num_sampled, prefill_bucket)
            num_sampled = prefill_bucket.num_seqs
            # The graph's attention takes the prefill kernel for every row (also one-token
            # rows): a decode split would bake this step's decode-row count into the graph.
            max_query_len = max(max_query_len, 2)
        elif padded_seqs > num_seqs:
            if num_tokens != num_seqs or num_sampled != num_seqs:
                raise ValueError("only decode-only batches (one sampled token each) are padded")
            self._pad(num_seqs, padded_seqs)
            num_sampled = padded_seqs
            max_query_len = 1  # decode rows and padding rows alike
        query_start_loc_host = query_start_loc[: padded_seqs + 1].tolist()
        seq_lens_host = self._seq_lens[1][:padded_seqs].tolist()
        # A mixed step whose leading rows are one-token (decode) rows: attention runs those
        # through the decode kernel and the rest, rebased to token 0, through the prefill one.
        num_decode = 0
        if max_query_len > 1 and prefill_bucket is None:
            num_decode = int(np.argmax(query_lens != 1))
        prefill_query_start_loc = None
        if num_decode:
            rebased = self._prefill_query_start_loc[1]
            count = num_seqs - num_decode + 1
            rebased[:count] = query_start_loc[num_decode : num_seqs + 1] - num_decode
            prefill_query_start_loc = self._copy(self._prefill_query_start_loc, count)
        metadata = AttentionMetadata(
            query_start_loc=self._copy(self._query_start_loc, padded_seqs + 1),
            seq_lens=self._copy(self._seq_lens, padded_seqs),
            block_tables=self._copy_block_tables(padded_seqs, widest),
            slot_mapping=self._copy(self._slot_mapping, padded_tokens),
            query_start_loc_host=query_start_loc_host,
            seq_lens_host=seq_lens_host,
            max_query_len=max_query_len,
            max_seq_len=max(seq_lens_host, default=0),
            num_decode_seqs=num_decode,
            prefill_query_start_loc=prefill_query_start_loc,
        )
        inputs = ModelInputs(
            input_ids=self._copy(self._input_ids, padded_tokens),
            positions=self._copy(self._positions, padded_tokens),
            metadata=metadata,
            logits_indices=self._copy(self._logits_indices, num_sampled),
            logits_request_ids=logits_ids,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        )
        if self._copies_done is not None:
            self._copies_done.record()
        return inputs

    def _check_blocks(
        self,
        scheduled: list[BatchRow],
        seq_lens: np.ndarray,
        block_counts: np.ndarray,
        block_size: int,
    ) -> None:
        """Every row's blocks must hold its tokens and fit a block-table row; the first row
        that fails is reported."""
        too_few = -(-seq_lens // block_size) > block_counts
        too_many = block_counts > self.max_blocks_per_seq
        failing = np.flatnonzero(too_few | too_many)
        if not len(failing):
            return
        row = int(failing[0])
        request = scheduled[row]
        if too_few[row]:
            raise ValueError(
                f"request {request.request_id}: {block_counts[row]} blocks cannot hold "
                f"{seq_lens[row]} tokens at block size {block_size}"
            )
        raise ValueError(
            f"request {request.request_id} has {block_counts[row]} blocks, more than the "
            f"{self.max_blocks_per_seq} a sequence may have"
        )

    def _pad(self, num_seqs: int, padded_seqs: int) -> None:
        """Padding rows for a captured graph: one token each (id 0, position 0) that writes
        nowhere (slot -1) and attends over one token of the null block 0, so attention stays
        finite. The block table rows are already zero."""
        num_tokens, padded_tokens = num_seqs, padded_seqs  # decode-only: one token per row
        self._input_ids[1][num_tokens:padded_tokens] = 0
        self._positions[1][num_tokens:padded_tokens] = 0
        self._slot_mapping[1][num_tokens:padded_tokens] = -1
        self._seq_lens[1][num_seqs:padded_seqs] = 1
        self._query_start_loc[1][num_seqs + 1 : padded_seqs + 1] = np.arange(
            num_tokens + 1, padded_tokens + 1
        )
        self._logits_indices[1][num_seqs:padded_seqs] = np.arange(num_tokens, padded_tokens)


    def _pad_prefill(self, num_tokens: int, num_seqs: int, num_sampled: int,
                     bucket: "PrefillBucket") -> None:
        """Padding for a captured prefill graph. Tokens [num_tokens, bucket.num_tokens): id 0
        at position 0, writing nowhere (slot -1), in no sequence (their attention rows are
        left unwritten; every later op is row-wise and no logits row reads them). Sequences
        [num_seqs, bucket.num_seqs): no tokens (query_start_loc stays at num_tokens, so the
        prefill kernel's programs for them exit at once), no context, the null block.
        Logits rows [num_sampled, bucket.num_seqs): token 0's row, ignored."""
        self._input_ids[1][num_tokens : bucket.num_tokens] = 0
        self._positions[1][num_tokens : bucket.num_tokens] = 0
        self._slot_mapping[1][num_tokens : bucket.num_tokens] = -1
        self._seq_lens[1][num_seqs : bucket.num_seqs] = 0
        self._query_start_loc[1][num_seqs + 1 : bucket.num_seqs + 1] = num_tokens
        self._logits_indices[1][num_sampled : bucket.num_seqs] = 0


@dataclass(frozen=True)
class PrefillBucket:
    """The padded shape of a captured prefill graph: a step of at most num_tokens tokens in
    at most num_seqs sequences, with at most num_seqs logits rows."""

    num_tokens: int
    num_seqs: int

    def fits(self, num_tokens: int, num_seqs: int, num_logits: int) -> bool:
        return num_tokens <= self.num_tokens and max(num_seqs, num_logits) <= self.num_seqs


def prepare_inputs(
    scheduled: list[BatchRow], block_size: int, device: torch.device | str = "cpu"
) -> ModelInputs:
    """One-off buffers sized for exactly this batch (tests and tools)."""
    num_tokens = max(1, sum(len(r.token_ids) for r in scheduled))
    max_blocks = max((len(r.block_ids) for r in scheduled), default=1)
    buffers = InputBuffers(num_tokens, max(1, len(scheduled)), max(1, max_blocks), device)
    return buffers.prepare(scheduled, block_size)


def int64_array(values: list[int]) -> np.ndarray:
    """As np.array(values, dtype=np.int64), for lists of Python ints, in one C loop
    (struct): numpy converts element by element through its scalar types, 2-3x slower; at
    a batch of 256 decode rows that is thousands of block ids every step."""
    array = np.empty(len(values), dtype=np.int64)
    struct.pack_into(f"{len(values)}q", array, 0, *values)
    return array

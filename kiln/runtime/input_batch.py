"""SchedulerOutput → the flat ragged tensors one forward pass takes.

    request A: 5 prompt tokens, 0 cached      request B: 1 decode token, 7 cached
    input_ids       [a0 a1 a2 a3 a4 | b7]
    positions       [ 0  1  2  3  4 |  7]
    query_start_loc [0, 5, 6]         seq_lens [5, 8]
    slot_mapping    [slot(A,0..4)   | slot(B,7)]   slot = block_table[pos // bs] * bs + pos % bs
    logits_indices  [4, 5]            (last token of each request that samples)

`InputBuffers` keeps these tensors allocated for the engine's lifetime: host staging copies
(pinned on CUDA) are filled with numpy, then copied to the device without blocking the host.
The device tensors never move, so CUDA graphs captured on views of them replay with each
step's inputs. A decode batch padded for a graph gets padding rows that write nowhere
(slot -1) and attend over one token of the reserved null block 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.layers.attention import AttentionMetadata
from kiln.runtime.outputs import ScheduledRequest


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    metadata: AttentionMetadata
    # (num_sampled,) int64: flat index of the last token of each request that samples.
    logits_indices: torch.Tensor
    sampled_request_ids: list[str]
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
        pin = self.device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, host.numpy(), torch.zeros(shape, dtype=dtype, device=self.device)

        self._input_ids = pair(max_num_tokens, torch.int64)
        self._positions = pair(max_num_tokens, torch.int64)
        self._slot_mapping = pair(max_num_tokens, torch.int64)
        self._query_start_loc = pair(max_num_seqs + 1, torch.int32)
        self._seq_lens = pair(max_num_seqs, torch.int32)
        self._logits_indices = pair(max_num_seqs, torch.int64)
        self._block_tables = pair((max_num_seqs, max_blocks_per_seq), torch.int32)

    def _copy(self, buffers, count, columns: int | None = None) -> torch.Tensor:
        host, _, device = buffers
        if columns is None:
            if self.device.type == "cpu":
                return host[:count].clone()
            device[:count].copy_(host[:count], non_blocking=True)
            return device[:count]
        if self.device.type == "cpu":
            return host[:count, :columns].clone()
        device[:count, :columns].copy_(host[:count, :columns], non_blocking=True)
        return device[:count]

    def prepare(
        self, scheduled: list[ScheduledRequest], block_size: int, pad_to: int | None = None
    ) -> ModelInputs:
        """Fill the buffers for this batch. With pad_to, the batch must be decode-only (one
        token per request) and is padded to pad_to sequences for a captured graph."""
        num_seqs = len(scheduled)
        num_tokens = sum(r.num_scheduled_tokens for r in scheduled)
        padded_seqs = pad_to or num_seqs
        padded_tokens = num_tokens + (padded_seqs - num_seqs)
        if padded_seqs > self.max_num_seqs or padded_tokens > self.max_num_tokens:
            raise ValueError(
                f"batch of {num_seqs} sequences / {num_tokens} tokens exceeds the input buffers "
                f"({self.max_num_seqs} / {self.max_num_tokens})"
            )
        input_ids, positions, slots = self._input_ids[1], self._positions[1], self._slot_mapping[1]
        query_start_loc, seq_lens = self._query_start_loc[1], self._seq_lens[1]
        logits_indices, block_tables = self._logits_indices[1], self._block_tables[1]
        sampled_ids: list[str] = []
        num_sampled = 0
        offset = 0
        widest = 1
        query_start_loc[0] = 0
        for row, request in enumerate(scheduled):
            start = request.num_computed_tokens
            count = request.num_scheduled_tokens
            end = start + count
            num_blocks = len(request.block_ids)
            if -(-end // block_size) > num_blocks:
                raise ValueError(
                    f"request {request.request_id}: {num_blocks} blocks cannot hold "
                    f"{end} tokens at block size {block_size}"
                )
            if num_blocks > self.max_blocks_per_seq:
                raise ValueError(
                    f"request {request.request_id} has {num_blocks} blocks, more than the "
                    f"{self.max_blocks_per_seq} a sequence may have"
                )
            block_ids = np.asarray(request.block_ids, dtype=np.int64)
            block_tables[row, :num_blocks] = block_ids
            widest = max(widest, num_blocks)
            token_positions = np.arange(start, end, dtype=np.int64)
            input_ids[offset : offset + count] = request.token_ids
            positions[offset : offset + count] = token_positions
            slots[offset : offset + count] = (
                block_ids[token_positions // block_size] * block_size + token_positions % block_size
            )
            offset += count
            query_start_loc[row + 1] = offset
            seq_lens[row] = end
            if request.sample:
                logits_indices[num_sampled] = offset - 1
                num_sampled += 1
                sampled_ids.append(request.request_id)
        if padded_seqs > num_seqs:
            if num_tokens != num_seqs or num_sampled != num_seqs:
                raise ValueError("only decode-only batches (one sampled token each) are padded")
            pad = slice(num_seqs, padded_seqs)
            input_ids[num_tokens:padded_tokens] = 0
            positions[num_tokens:padded_tokens] = 0
            slots[num_tokens:padded_tokens] = -1  # written nowhere
            seq_lens[pad] = 1  # one (null-block) token: finite attention, no NaN
            block_tables[pad, :widest] = 0
            query_start_loc[num_seqs + 1 : padded_seqs + 1] = np.arange(
                num_tokens + 1, padded_tokens + 1
            )
            logits_indices[num_sampled:padded_seqs] = np.arange(num_tokens, padded_tokens)
            num_sampled = padded_seqs

        query_lens = np.diff(query_start_loc[: padded_seqs + 1])
        metadata = AttentionMetadata(
            query_start_loc=self._copy(self._query_start_loc, padded_seqs + 1),
            seq_lens=self._copy(self._seq_lens, padded_seqs),
            block_tables=self._copy(self._block_tables, padded_seqs, columns=widest),
            slot_mapping=self._copy(self._slot_mapping, padded_tokens),
            query_start_loc_host=query_start_loc[: padded_seqs + 1].tolist(),
            seq_lens_host=seq_lens[:padded_seqs].tolist(),
            max_query_len=int(query_lens.max()) if padded_seqs else 0,
            max_seq_len=int(seq_lens[:padded_seqs].max()) if padded_seqs else 0,
        )
        return ModelInputs(
            input_ids=self._copy(self._input_ids, padded_tokens),
            positions=self._copy(self._positions, padded_tokens),
            metadata=metadata,
            logits_indices=self._copy(self._logits_indices, num_sampled),
            sampled_request_ids=sampled_ids,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        )


def prepare_inputs(
    scheduled: list[ScheduledRequest], block_size: int, device: torch.device | str = "cpu"
) -> ModelInputs:
    """One-off buffers sized for exactly this batch (tests and tools)."""
    num_tokens = max(1, sum(r.num_scheduled_tokens for r in scheduled))
    max_blocks = max((len(r.block_ids) for r in scheduled), default=1)
    buffers = InputBuffers(num_tokens, max(1, len(scheduled)), max(1, max_blocks), device)
    return buffers.prepare(scheduled, block_size)

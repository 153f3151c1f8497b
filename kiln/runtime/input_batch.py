"""SchedulerOutput → the flat ragged tensors one forward pass takes.

    request A: 5 prompt tokens, 0 cached      request B: 1 decode token, 7 cached
    input_ids       [a0 a1 a2 a3 a4 | b7]
    positions       [ 0  1  2  3  4 |  7]
    query_start_loc [0, 5, 6]         seq_lens [5, 8]
    slot_mapping    [slot(A,0..4)   | slot(B,7)]   slot = block_table[pos // bs] * bs + pos % bs
    logits_indices  [4, 5]            (last token of each request that samples)
"""

from __future__ import annotations

from dataclasses import dataclass

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


def prepare_inputs(
    scheduled: list[ScheduledRequest], block_size: int, device: torch.device | str = "cpu"
) -> ModelInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampled_ids: list[str] = []
    max_blocks = max((len(r.block_ids) for r in scheduled), default=0)
    block_table = torch.zeros(len(scheduled), max(max_blocks, 1), dtype=torch.int32)
    for row, request in enumerate(scheduled):
        start = request.num_computed_tokens
        end = start + request.num_scheduled_tokens
        if -(-end // block_size) > len(request.block_ids):
            raise ValueError(
                f"request {request.request_id}: {len(request.block_ids)} blocks cannot hold "
                f"{end} tokens at block size {block_size}"
            )
        input_ids.extend(request.token_ids)
        positions.extend(range(start, end))
        slots.extend(
            request.block_ids[pos // block_size] * block_size + pos % block_size
            for pos in range(start, end)
        )
        query_start_loc.append(query_start_loc[-1] + request.num_scheduled_tokens)
        seq_lens.append(end)
        block_table[row, : len(request.block_ids)] = torch.tensor(request.block_ids)
        if request.sample:
            logits_indices.append(query_start_loc[-1] - 1)
            sampled_ids.append(request.request_id)

    def to_device(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        query_start_loc=to_device(query_start_loc, torch.int32),
        seq_lens=to_device(seq_lens, torch.int32),
        block_tables=block_table.to(device, non_blocking=True),
        slot_mapping=to_device(slots, torch.int64),
        query_start_loc_host=query_start_loc,
        seq_lens_host=seq_lens,
    )
    return ModelInputs(
        input_ids=to_device(input_ids, torch.int64),
        positions=to_device(positions, torch.int64),
        metadata=metadata,
        logits_indices=to_device(logits_indices, torch.int64),
        sampled_request_ids=sampled_ids,
    )

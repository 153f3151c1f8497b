"""How many KV blocks fit on the GPU: measured with a profiling forward, not guessed.

After the weights and input buffers are on the device, the runner runs the largest step the
scheduler may ever give it — one sequence of max_num_batched_tokens tokens, logits for
max_num_seqs rows, and the sampler's costliest path (top-k + top-p sort over the whole
vocabulary) — and records the peak of torch's allocator. Then

    KV budget = total · gpu_memory_utilization − (memory in use now) − (peak − allocated now)

where "in use now" (total − free, after the allocator's cache is released) counts the
weights, the CUDA context, other processes on the GPU, and everything this process holds;
and the second term is the activation headroom a step needs on top. CUDA graphs are
captured after the KV cache: their pool (hundreds of MiB) comes out of the 1 −
gpu_memory_utilization slack, as in vLLM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.runtime.input_batch import BatchRow, prepare_inputs
from kiln.runtime.kv_tensors import KVCacheSpec, allocate_kv_caches
from kiln.runtime.sampler import Sampler, SamplingMetadata, SamplingRow
from kiln.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class MemoryProfile:
    num_kv_blocks: int
    activation_peak_bytes: int  # a worst-case step's allocations beyond what persists
    in_use_bytes: int  # device memory in use before the KV cache (weights, context, others)
    total_bytes: int
    seconds: float


@torch.inference_mode()
def profile_kv_blocks(
    model: torch.nn.Module,
    device: torch.device,
    kv_cache_spec: KVCacheSpec,
    block_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    gpu_memory_utilization: float,
    max_blocks: int,
    max_model_len: int,
) -> MemoryProfile:
    started = time.perf_counter()
    bytes_per_block = kv_cache_spec.bytes_per_block(block_size)
    num_tokens = max_num_batched_tokens
    num_rows = min(max_num_seqs, num_tokens)
    # The step's tokens as sequences of at most max_model_len: no position past what the
    # model serves (a longer one would read past the RoPE table: an illegal access on CUDA).
    lengths = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
    # A scratch cache just large enough for them (+ the null block).
    blocks_per_row = [-(-length // block_size) for length in lengths]
    scratch_blocks = sum(blocks_per_row) + 1
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated(device)
    scratch_kv = allocate_kv_caches(kv_cache_spec, scratch_blocks, block_size, device)
    batch, first_block = [], 1
    for index, (length, num_blocks) in enumerate(zip(lengths, blocks_per_row)):
        batch.append(BatchRow(
            f"memory-profile-{index}", [0] * length, 0,
            list(range(first_block, first_block + num_blocks)), (length - 1,),
        ))
        first_block += num_blocks
    inputs = prepare_inputs(batch, block_size, device)
    torch.cuda.reset_peak_memory_stats(device)
    hidden = model(inputs.input_ids, inputs.positions, scratch_kv, inputs.metadata)
    logits = None
    if model.parallel.is_last_stage:  # earlier pipeline stages have no LM head
        logits = model.compute_logits(hidden[:num_rows])  # (rows, V): a full decode batch
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05)
        rows = [SamplingRow(params=params, prompt_token_ids=(), output_token_ids=())
                for _ in range(num_rows)]
        Sampler()(logits, SamplingMetadata.build(rows, logits.shape[-1], device))
    torch.cuda.synchronize(device)
    # What the step allocated beyond the scratch cache and its inputs (both freed below).
    scratch_bytes = sum(t.numel() * t.element_size() for t in scratch_kv)
    activation_peak = torch.cuda.max_memory_allocated(device) - allocated_before - scratch_bytes
    del hidden, logits, scratch_kv, inputs
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    budget = total * gpu_memory_utilization - in_use - activation_peak
    num_blocks = min(int(budget // bytes_per_block), max_blocks)
    if num_blocks < 2:
        raise KilnError(
            f"not enough GPU memory for the KV cache: {budget / 2**30:.2f} GiB left of "
            f"{total / 2**30:.1f} GiB × gpu_memory_utilization {gpu_memory_utilization} after "
            f"{in_use / 2**30:.1f} GiB in use and a {activation_peak / 2**30:.2f} GiB step peak "
            f"(one block needs {bytes_per_block / 2**20:.2f} MiB); raise gpu_memory_utilization "
            f"or lower max_num_batched_tokens / max_num_seqs"
        )
    return MemoryProfile(num_blocks, activation_peak, in_use, total, time.perf_counter() - started)


def cpu_kv_blocks(budget_bytes: int, bytes_per_block: int, max_blocks: int) -> int:
    """KV blocks on the CPU: as many as EngineConfig.cpu_kv_cache_bytes holds (no profiling
    there), at most max_blocks."""
    num_blocks = min(budget_bytes // bytes_per_block, max_blocks)
    if num_blocks < 2:
        raise KilnError(
            f"cpu_kv_cache_bytes {budget_bytes} holds fewer than 2 KV blocks of "
            f"{bytes_per_block / 2**20:.2f} MiB; raise cpu_kv_cache_bytes or lower block_size"
        )
    return num_blocks

"""CUDA graphs for prefill and mixed steps: whole forwards captured per padded token count.

An eager step launches ~10 kernels per layer from Python (Triton's launcher costs tens of µs
each): a 128-token prefill of an 8B model spends longer launching than computing. Here, at
start, the runner captures `model(...) → logits` once per bucket of padded token counts
(prefill_buckets: 16, 32, 64, ... up to PREFILL_GRAPH_MAX_TOKENS), each with room for up to
min(tokens, PREFILL_GRAPH_MAX_SEQS) sequences and as many logits rows. A step of T tokens in
S sequences with L logits rows replays the smallest bucket that holds all three after
InputBuffers.prepare(..., prefill_bucket=) has written its inputs and padding:

    tokens    [real T | padding: id 0, position 0, slot -1 (writes nowhere), in no sequence]
    sequences [real S | padding: no tokens, no context: their attention programs exit]
    logits    [real L | padding: token 0's row, ignored]

Everything a step varies lives in the persistent device buffers; the kernels' grids depend
only on the bucket (the prefill attention kernel finds each program's sequence on the GPU
and exits on padding), so one graph serves every mix of prompt chunks and decode rows of that
size. Attention takes the prefill kernel for every row, one-token rows too: the decode split
of an eager mixed step would bake the step's decode-row count into the graph. That kernel
is slower than split-K decode for long contexts, so a step whose one-token rows have long
contexts (PREFILL_GRAPH_MAX_DECODE_CONTEXT) runs eagerly, as do steps past the largest
bucket (where launch overhead is small next to the GEMMs).

Memory: the decode graphs' shared logits buffer and their pool are reused (captured largest
first; no two graphs replay at once), so what these add is the largest bucket's transients
beyond the largest decode graph's.
"""

from __future__ import annotations

import bisect
import time

import torch

from kiln.runtime.cuda_graphs import CaptureReport
from kiln.runtime.input_batch import BatchRow, InputBuffers, ModelInputs, PrefillBucket

# Larger steps are GEMM-bound: 1,024 tokens of an 8B model are ~15 TFLOP (~20 ms), against a
# few ms of launches, and each bucket costs a capture at start.
PREFILL_GRAPH_MAX_TOKENS = 1024
# Logits rows (= sequences) a bucket holds at most: every bucket computes logits for all its
# rows (an LM head GEMM of this many rows), so small buckets stay small.
PREFILL_GRAPH_MAX_SEQS = 256
# A one-token row attends through the prefill kernel in a graph (one program per query
# head walking the whole context); past this context the eager decode split is faster.
PREFILL_GRAPH_MAX_DECODE_CONTEXT = 4096


def prefill_buckets(max_num_tokens: int, max_num_seqs: int,
                    max_tokens: int = PREFILL_GRAPH_MAX_TOKENS,
                    max_seqs: int = PREFILL_GRAPH_MAX_SEQS) -> list[PrefillBucket]:
    """Token counts 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024 (powers of two and their
    midpoints from 128 up: padding wastes < 50 % below 128 tokens, where the step is
    weight-bound and padding is nearly free, and < 34 % above), within the input buffers;
    each holds min(tokens, max_seqs, max_num_seqs) sequences."""
    sizes = [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    limit = min(max_tokens, max_num_tokens)
    return [PrefillBucket(size, min(size, max_seqs, max_num_seqs)) for size in sizes
            if size <= limit]


class PrefillGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        buffers: InputBuffers,
        block_size: int,
        buckets: list[PrefillBucket],
    ) -> None:
        if not buckets:
            raise ValueError("no prefill buckets to capture")
        for bucket in buckets:
            if bucket.num_tokens > buffers.max_num_tokens or bucket.num_seqs > buffers.max_num_seqs:
                raise ValueError(f"prefill bucket {bucket} exceeds the input buffers "
                                 f"({buffers.max_num_tokens} tokens / {buffers.max_num_seqs} seqs)")
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.block_size = block_size
        self.buckets = sorted(buckets, key=lambda b: b.num_tokens)
        self._token_sizes = [b.num_tokens for b in self.buckets]
        self._graphs: dict[PrefillBucket, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None

    def bucket_for(self, rows: list[BatchRow]) -> PrefillBucket | None:
        """The smallest bucket holding this step, or None (run it eagerly)."""
        num_tokens = 0
        num_logits = 0
        for row in rows:
            count = len(row.token_ids)
            num_tokens += count
            num_logits += len(row.logits_offsets)
            if count == 1 and row.num_computed_tokens >= PREFILL_GRAPH_MAX_DECODE_CONTEXT:
                return None
        index = bisect.bisect_left(self._token_sizes, num_tokens)
        for bucket in self.buckets[index:]:
            if bucket.fits(num_tokens, len(rows), num_logits):
                return bucket
        return None

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        rows = hidden[inputs.logits_indices]
        if self._logits is None:
            vocab_size = self.model.lm_head.vocab_size
            most = max(b.num_seqs for b in self.buckets)
            self._logits = torch.empty((most, vocab_size), dtype=hidden.dtype, device=hidden.device)
        return self.model.compute_logits_into(rows, self._logits[: rows.shape[0]])

    @torch.inference_mode()
    def capture(self, pool=None, logits: torch.Tensor | None = None) -> CaptureReport:
        """Warm up and capture every bucket, largest first. `pool`: the decode graphs'
        pool, whose blocks the buckets reuse; `logits`: the decode graphs' shared logits
        buffer, when it has rows enough (no two graphs replay at once, and the sampler of
        one step reads its logits before the next replay: stream order)."""
        if logits is not None and logits.shape[0] >= max(b.num_seqs for b in self.buckets):
            self._logits = logits
        started = time.perf_counter()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved()
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        warmup_seconds = 0.0
        for bucket in reversed(self.buckets):
            inputs = self.buffers.prepare([], self.block_size, prefill_bucket=bucket)
            warmup_started = time.perf_counter()
            self._forward(inputs)  # Triton compiles, cuBLAS picks kernels: not capturable
            torch.cuda.synchronize()
            warmup_seconds += time.perf_counter() - warmup_started
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(inputs)
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return CaptureReport(
            sizes=[b.num_tokens for b in self.buckets],
            seconds=time.perf_counter() - started,
            memory_bytes=torch.cuda.memory_reserved() - reserved_before,
            warmup_seconds=warmup_seconds,
        )

    def replay(self, bucket: PrefillBucket) -> torch.Tensor:
        """Replay with whatever InputBuffers last prepared for `bucket`: its (num_seqs, V)
        logits, a view of the shared buffer that the next replay overwrites (the sampler
        reads it first: stream order)."""
        self._graphs[bucket].replay()
        return self._logits[: bucket.num_seqs]

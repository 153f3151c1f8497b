"""CUDA graphs for decode-only steps.

At start the runner captures `model(...) → compute_logits` once per padded batch size
(capture_sizes: 1, 2, 4, 8, then every 8 up to 64, every 16 up to 128, every 32 up to 256, ...
and max_num_seqs), largest first, all in one memory pool. A decode step of B sequences replays
the smallest captured size ≥ B after InputBuffers has written the step's inputs (padding rows
write nowhere and read the null block), so the whole forward is one launch from the host's
point of view. Prefill and mixed steps up to 1,024 tokens replay graphs of their own
(prefill_graphs.py), captured after these into the same pool; larger ones run eagerly.

Memory: every graph writes its logits into one shared buffer, so what capture keeps is

    shared logits (max size, V) model dtype      one buffer, outside the pool, written by
                                                 the LM head's GEMM itself (no float32 copy:
                                                 the sampler reads bf16 or converts exactly)
    + the pool: the largest graph's transients   smaller graphs reuse the same blocks

instead of one live (size, V) output per graph (Llama-3's vocabulary: 512 KB a row, 2.3 GB
over 36 sizes up to 256). Intermediates of a graph are dead once its replay ends, so graphs
may share pool blocks as long as no two replay at once (one engine loop, one stream).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import torch

from kiln.runtime.input_batch import InputBuffers


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture, sorted: 1, 2, 4, 8, then steps of 8 up to 64, and from there
    the step doubles each time the size does (16 up to 128, 32 up to 256, 64 up to 512, ...),
    plus max_num_seqs itself. Small batches are weight-bound, so padding them is nearly free;
    from 64 up a batch of n pads to less than 1.25 n (waste < 20 %), with about half the
    captures of a step of 8 (19 instead of 36 at 256)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
    sizes = {1, 2, 4, 8}
    size, step = 16, 8
    while size <= max_num_seqs:
        sizes.add(size)
        if size >= 64 and size == step * 8:
            step *= 2  # 64 → steps of 16, 128 → 32, 256 → 64, ...
        size += step
    sizes.add(max_num_seqs)
    return sorted(s for s in sizes if s <= max_num_seqs)


@dataclass(frozen=True)
class CaptureReport:
    sizes: list[int]
    seconds: float  # everything: warm-ups and captures
    # Device memory capture kept: growth of the allocator's reserved bytes once its cache of
    # free blocks is released (the shared logits buffer, the graph pool, cuBLAS workspaces).
    memory_bytes: int
    # Of `seconds`, the eager warm-up runs: Triton compiles (cold cache) and cuBLAS heuristics.
    warmup_seconds: float = 0.0
    # Token counts of the prefill/mixed-step graphs (prefill_graphs.py), when captured: their
    # seconds and memory are included in the fields above and also given on their own.
    prefill_token_sizes: tuple[int, ...] = ()
    prefill_seconds: float = 0.0
    prefill_memory_bytes: int = 0

    def describe(self) -> str:
        text = (
            f"captured {len(self.sizes)} CUDA graphs (batch sizes {self.sizes[0]}…"
            f"{self.sizes[-1]}) in {self.seconds:.1f} s (warm-up {self.warmup_seconds:.1f} s) "
            f"using {self.memory_bytes / 2**20:.0f} MiB"
        )
        if self.prefill_token_sizes:
            text += (
                f", of which {len(self.prefill_token_sizes)} prefill graphs (tokens "
                f"{self.prefill_token_sizes[0]}…{self.prefill_token_sizes[-1]}) in "
                f"{self.prefill_seconds:.1f} s using {self.prefill_memory_bytes / 2**20:.0f} MiB"
            )
        return text

    def with_prefill(self, prefill: "CaptureReport") -> "CaptureReport":
        """This decode report with the prefill graphs' capture added in."""
        return CaptureReport(
            sizes=self.sizes,
            seconds=self.seconds + prefill.seconds,
            memory_bytes=self.memory_bytes + prefill.memory_bytes,
            warmup_seconds=self.warmup_seconds + prefill.warmup_seconds,
            prefill_token_sizes=tuple(prefill.sizes),
            prefill_seconds=prefill.seconds,
            prefill_memory_bytes=prefill.memory_bytes,
        )


class CudaGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        buffers: InputBuffers,
        block_size: int,
        sizes: list[int],
    ) -> None:
        if not sizes or min(sizes) < 1 or max(sizes) > buffers.max_num_seqs:
            raise ValueError(
                f"capture sizes {sizes} must be non-empty and within 1..{buffers.max_num_seqs}"
            )
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.block_size = block_size
        self.sizes = sorted(set(sizes))
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # (max size, V) float32: every graph writes its logits into the first `size` rows.
        self._logits: torch.Tensor | None = None
        self.pool = None

    @property
    def logits(self) -> torch.Tensor | None:
        """The shared (max size, V) logits buffer (after capture)."""
        return self._logits

    def size_for(self, num_seqs: int) -> int | None:
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else None

    def _forward(self, inputs) -> torch.Tensor:
        """Into the shared buffer: (size, V) logits in the model dtype, one row per sequence."""
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        if self._logits is None:
            vocab_size = self.model.lm_head.vocab_size
            self._logits = torch.empty((self.sizes[-1], vocab_size), dtype=hidden.dtype,
                                       device=hidden.device)
        return self.model.compute_logits_into(hidden, self._logits[: hidden.shape[0]])

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        started = time.perf_counter()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        self.pool = pool  # the prefill graphs capture into it too (prefill_graphs.py)
        warmup_seconds = 0.0
        # Largest first: the pool grows to the largest graph's needs once, and every smaller
        # capture reuses its blocks.
        for size in reversed(self.sizes):
            # The host→device input copies stay outside the graph: each step's prepare()
            # refills the same device buffers the graph reads.
            inputs = self.buffers.prepare([], self.block_size, pad_to=size)
            # One eager run outside the graph: Triton compiles and loads any kernel
            # specialisation this size is the first to need (batch size changes constexprs
            # such as the decode split count, and integer-argument specialisation), and cuBLAS
            # picks its kernels for this shape. Work like that cannot be captured; nothing
            # needs a second run.
            warmup_started = time.perf_counter()
            self._forward(inputs)
            torch.cuda.synchronize()
            warmup_seconds += time.perf_counter() - warmup_started
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                # The LM head writes straight into the shared buffer, outside the pool.
                self._forward(inputs)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-ups' cached blocks: not kept by capture
        return CaptureReport(
            sizes=self.sizes,
            seconds=time.perf_counter() - started,
            memory_bytes=torch.cuda.memory_reserved() - reserved_before,
            warmup_seconds=warmup_seconds,
        )

    def replay(self, size: int) -> torch.Tensor:
        """Replay with whatever InputBuffers last prepared (padded to `size`). Returns the
        (size, V) logits: a view of the shared buffer, which the next replay overwrites. Work
        queued on the same stream before that replay (the sampler, also with overlap
        scheduling) reads it first: stream order, no copy needed."""
        self._graphs[size].replay()
        return self._logits[:size]

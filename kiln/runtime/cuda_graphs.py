"""CUDA graphs for decode-only steps.

At start the runner captures `model(...) → compute_logits` once per padded batch size
(1, 2, 4, 8, 16, 24, 32, 40, ... up to max_num_seqs), largest first, all in one memory pool.
A decode step of B sequences replays the smallest captured size ≥ B after InputBuffers has
written the step's inputs (padding rows write nowhere and read the null block), so the whole
forward is one launch from the host's point of view. Prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import torch

from kiln.runtime.input_batch import InputBuffers


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 8))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


@dataclass(frozen=True)
class CaptureReport:
    sizes: list[int]
    seconds: float
    memory_bytes: int

    def describe(self) -> str:
        return (
            f"captured {len(self.sizes)} CUDA graphs (batch sizes {self.sizes[0]}…{self.sizes[-1]}) "
            f"in {self.seconds:.1f} s using {self.memory_bytes / 2**20:.0f} MiB"
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
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.block_size = block_size
        self.sizes = sorted(sizes)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def size_for(self, num_seqs: int) -> int | None:
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else None

    def _forward(self, inputs) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        return self.model.compute_logits(hidden)  # (size, V): one token per sequence

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        started = time.perf_counter()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            # The host→device input copies stay outside the graph: each step's prepare()
            # refills the same device buffers the graph reads.
            inputs = self.buffers.prepare([], self.block_size, pad_to=size)
            # Warm up outside the graph: Triton compiles and cuBLAS picks its kernels here.
            for _ in range(2):
                self._forward(inputs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(inputs)
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize()
        return CaptureReport(
            sizes=self.sizes,
            seconds=time.perf_counter() - started,
            memory_bytes=torch.cuda.memory_allocated() - before,
        )

    def replay(self, size: int) -> torch.Tensor:
        """Replay with whatever InputBuffers last prepared (padded to `size`)."""
        graph, logits = self._graphs[size]
        graph.replay()
        return logits

"""Runs one SchedulerOutput through the model and the sampler.

    SchedulerOutput ─InputBuffers→ flat ragged tensors ─model→ hidden (T, H)
      ─hidden[logits_indices]→ logits (R, V) ─Sampler→ token ids ─one host copy→ ModelRunnerOutput

Decode-only steps on CUDA replay a captured graph (cuda_graphs.py); everything else runs
eagerly. The step's only device→host synchronisation is copying the sampled ids back.

`execute_async` launches a step and returns at once; `collect` waits for its sampled ids.
Between the two the host may schedule and launch the next step (overlap scheduling): that
step's inputs may then hold placeholders (-1) for tokens the previous step is still
sampling, which `execute_async` fills on the device from the previous step's sampled ids
before the forward, so the host never waits for them. `execute` is the two back to back.

The runner owns the model, the paged KV tensors, the persistent input buffers and the
per-request generators of seeded requests. It sees requests (sampling parameters, token
history) through `register`, which the engine calls when a request is added; `forget` drops
them (the engine calls it when a request ends; ids in a SchedulerOutput's finished list too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import EngineInfo
from kiln.kernels.ops import use_reference_kernels
from kiln.kernels.sampling import sample_gumbel
from kiln.runtime.cuda_graphs import CaptureReport, CudaGraphRunner, capture_sizes
from kiln.runtime.input_batch import InputBuffers
from kiln.runtime.kv_tensors import allocate_kv_caches, kv_cache_bytes_per_block
from kiln.runtime.memory_profile import MemoryProfile, profile_kv_blocks
from kiln.runtime.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from kiln.runtime.request import Request
from kiln.runtime.sampler import (
    LogprobsTensors,
    RequestGenerators,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    to_token_logprobs,
)
from kiln.runtime.scheduler import PLACEHOLDER_TOKEN_ID


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device; `ModelRunner.collect` turns it into a
    ModelRunnerOutput."""

    request_ids: list[str]  # the sampled rows, in order
    token_ids: torch.Tensor | None  # (R,) int64 on the host (pinned on CUDA), filled async
    logprobs: LogprobsTensors | None  # host copies, filled async
    num_logprobs: list[int | None]
    done: torch.cuda.Event | None  # recorded after the copies; None on the CPU
    started: torch.cuda.Event | None  # recorded before the step's first device work
    graphed: bool = False  # a decode step replayed from a CUDA graph


class ModelRunner:
    def __init__(
        self,
        engine: EngineInfo,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        num_kv_blocks: int | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_cuda_graphs: bool = True,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        """num_kv_blocks None (CUDA only): size the KV cache with a profiling forward
        (memory_profile.py) to fill gpu_memory_utilization of the device."""
        self.engine = engine
        self.device = device
        self.block_size = block_size
        started = time.perf_counter()
        self.model = load_engine_model(engine, device, dtype)
        _sync(device)
        self.load_seconds = time.perf_counter() - started
        max_blocks_per_seq = -(-max_model_len // block_size)
        self.buffers = InputBuffers(
            max_num_tokens=max(max_num_batched_tokens, max_num_seqs),
            max_num_seqs=max_num_seqs,
            max_blocks_per_seq=max_blocks_per_seq,
            device=device,
        )
        self.memory_profile: MemoryProfile | None = None
        if num_kv_blocks is None:
            if device.type != "cuda":
                raise ValueError("num_kv_blocks must be given on the CPU (no memory profiling there)")
            self.memory_profile = profile_kv_blocks(
                self.model, device, dtype, block_size,
                kv_cache_bytes_per_block(engine.model_config, block_size, dtype),
                max_num_batched_tokens, max_num_seqs, gpu_memory_utilization,
                # Never more than every sequence at full length needs (+1: the null block).
                max_blocks=max_num_seqs * max_blocks_per_seq + 1,
            )
            num_kv_blocks = self.memory_profile.num_kv_blocks
        self.num_kv_blocks = num_kv_blocks
        started = time.perf_counter()
        self.kv_caches = allocate_kv_caches(
            engine.model_config, num_kv_blocks, block_size, dtype, device
        )
        _sync(device)
        self.kv_allocation_seconds = time.perf_counter() - started
        self.sampler = Sampler()
        self.generators = RequestGenerators(device)
        self._requests: dict[str, Request] = {}
        # The last launched step's sampled ids, still on the device, and each request's row
        # in them: the source of the next step's placeholder tokens.
        self._last_sampled = torch.empty(0, dtype=torch.int64, device=device)
        self._last_sampled_rows: dict[str, int] = {}
        # Host seconds spent blocked in collect() and device seconds of the collected steps
        # (CUDA only): the benchmarks report CPU time per step next to GPU time per step.
        self.wait_seconds = 0.0
        self.gpu_seconds = 0.0
        # Of those, the decode steps replayed from CUDA graphs (the rest ran eagerly).
        self.graph_steps = 0
        self.graph_gpu_seconds = 0.0
        self.graphs: CudaGraphRunner | None = None
        self.capture_report: CaptureReport | None = None
        if enable_cuda_graphs and device.type == "cuda" and not use_reference_kernels():
            self.graphs = CudaGraphRunner(
                self.model, self.kv_caches, self.buffers, block_size, capture_sizes(max_num_seqs)
            )
            self.capture_report = self.graphs.capture()
        if device.type == "cuda" and not use_reference_kernels():
            # Compile the temperature-only sampling kernels now rather than in the first
            # step that needs them (a second or two, inside someone's latency): for the
            # eager steps' float32 logits and the graphs' logits in the model dtype.
            vocab_size = self.model.lm_head.vocab_size
            for logits_dtype in {torch.float32, dtype}:
                sample_gumbel(torch.zeros(1, vocab_size, dtype=logits_dtype, device=device),
                              torch.ones(1, device=device),
                              torch.zeros(1, dtype=torch.bool, device=device), seed=0)

    def register(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.generators.drop(request_id)

    def _graph_size(self, scheduler_output: SchedulerOutput) -> int | None:
        if self.graphs is None:
            return None
        scheduled = scheduler_output.scheduled
        if not all(r.num_scheduled_tokens == 1 and r.sample for r in scheduled):
            return None
        return self.graphs.size_for(len(scheduled))

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.execute_async(scheduler_output))

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> LaunchedStep:
        for request_id in scheduler_output.finished_request_ids:
            self.forget(request_id)
        if scheduler_output.is_empty:
            return LaunchedStep([], None, None, [], None, None)
        graph_size = self._graph_size(scheduler_output)
        scheduled = _decode_rows_first(scheduler_output.scheduled)
        inputs = self.buffers.prepare(scheduled, self.block_size, pad_to=graph_size)
        # After the host work of prepare(): the GPU time of a step should not count the GPU
        # waiting for this host.
        started = self._record_event()
        self._fill_placeholders(scheduled, inputs)
        if graph_size is not None:
            logits = self.graphs.replay(graph_size)[: inputs.num_seqs]  # (R, V) model dtype
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
            if not inputs.sampled_request_ids:
                return LaunchedStep([], None, None, [], self._record_event(), started)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # (R, V) float32
        launched = self._sample(logits, inputs.sampled_request_ids, started)
        launched.graphed = graph_size is not None
        return launched

    def collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step's sampled ids (the step's one device → host sync)."""
        if step.done is not None:
            waited = time.perf_counter()
            step.done.synchronize()
            self.wait_seconds += time.perf_counter() - waited
            if step.started is not None:
                seconds = step.started.elapsed_time(step.done) / 1000
                self.gpu_seconds += seconds
                if step.graphed:
                    self.graph_steps += 1
                    self.graph_gpu_seconds += seconds
        if step.token_ids is None:
            return ModelRunnerOutput(sampled_token_ids={})
        token_ids = step.token_ids.tolist()
        logprobs = to_token_logprobs(token_ids, step.logprobs, step.num_logprobs)
        return ModelRunnerOutput(
            sampled_token_ids={rid: [t] for rid, t in zip(step.request_ids, token_ids)},
            logprobs={
                rid: [record] for rid, record in zip(step.request_ids, logprobs) if record is not None
            },
        )

    def _record_event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _fill_placeholders(self, scheduled: list[ScheduledRequest], inputs) -> None:
        """Write the previous step's sampled ids (still on the device) into the input
        positions the scheduler left as placeholders."""
        positions: list[int] = []
        rows: list[int] = []
        starts = inputs.metadata.query_start_loc_host
        for index, request in enumerate(scheduled):
            if request.token_ids[-1] != PLACEHOLDER_TOKEN_ID:
                continue
            row = self._last_sampled_rows.get(request.request_id)
            if row is None or len(request.token_ids) > 1 and PLACEHOLDER_TOKEN_ID in request.token_ids[:-1]:
                raise RuntimeError(
                    f"request {request.request_id!r} has a placeholder token that no "
                    f"previous step sampled"
                )
            positions.append(starts[index + 1] - 1)
            rows.append(row)
        if not positions:
            return
        # One host → device copy for both index lists.
        rows_and_positions = _to_device([rows, positions], self.device)
        source = self._last_sampled.index_select(0, rows_and_positions[0])
        inputs.input_ids.index_copy_(0, rows_and_positions[1], source)

    def _sample(
        self, logits: torch.Tensor, request_ids: list[str], started: torch.cuda.Event | None
    ) -> LaunchedStep:
        rows = []
        for request_id in request_ids:
            request = self._requests[request_id]
            rows.append(
                SamplingRow(
                    params=request.sampling_params,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=request.output_token_ids,
                    eos_token_id=request.eos_token_id,
                    generator=self.generators.get(request_id, request.sampling_params),
                    # Sampled by earlier steps still in flight (this step's own is the last).
                    num_pending_output_tokens=max(0, request.num_pending_tokens - 1),
                )
            )
        metadata = SamplingMetadata.build(rows, logits.shape[-1], self.device)
        sampled = self.sampler(logits, metadata)
        self._last_sampled = sampled.sampled_token_ids
        self._last_sampled_rows = {rid: row for row, rid in enumerate(request_ids)}
        return LaunchedStep(
            request_ids=request_ids,
            token_ids=_to_host(sampled.sampled_token_ids),
            logprobs=(
                None if sampled.logprobs is None
                else LogprobsTensors(*(_to_host(t) for t in (
                    sampled.logprobs.sampled_logprobs,
                    sampled.logprobs.top_token_ids,
                    sampled.logprobs.top_logprobs,
                )))
            ),
            num_logprobs=metadata.num_logprobs,
            done=self._record_event(),
            started=started,
        )


def _decode_rows_first(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """A mixed step's one-token (decode) rows first, each group in scheduler order, so
    attention can hand them to the decode kernel as one leading slice (input_batch.py marks
    it). Rows are matched to outputs by request id, so the order is the runner's own."""
    decode = [request for request in scheduled if request.num_scheduled_tokens == 1]
    if len(decode) in (0, len(scheduled)):
        return scheduled
    return decode + [request for request in scheduled if request.num_scheduled_tokens != 1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start a device → host copy without waiting for it (pinned memory on CUDA)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)

"""Runs one SchedulerOutput through the model and the sampler.

    SchedulerOutput ─RunnerRequests→ batch rows ─InputBuffers→ flat ragged tensors
      ─model→ hidden (T, H) ─hidden[logits_indices]→ logits (L, V) ─Sampler→ token ids
      ─one host copy→ ModelRunnerOutput

Decode-only steps on CUDA replay a captured graph (cuda_graphs.py); prefill and mixed steps
up to PREFILL_GRAPH_MAX_TOKENS replay a graph of their padded token count (prefill_graphs.py);
larger steps run eagerly. The step's only device→host synchronisation is copying the sampled ids back.

`execute_async` launches a step and returns at once; `collect` waits for its sampled ids.
Between the two the host may schedule and launch the next step (overlap scheduling): that
step's inputs may then hold placeholders (-1) for tokens the previous step is still
sampling, which `execute_async` fills on the device from the previous step's sampled ids
before the forward, so the host never waits for them. `execute` is the two back to back.
`execute_async(..., defer_sampling=True)` queues the forward only; `sample_deferred` then
samples it with a token bitmask the engine built meanwhile (structured outputs).

The runner owns the model, the paged KV tensors, the persistent input buffers, the
per-request generators of seeded requests and its own copy of every request
(runner_requests.py). It knows requests only through the step messages: it imports nothing
from the scheduler, so it could run in another process that gets the messages as bytes.

A row verifying k speculative tokens gets k + 1 logits rows and returns 1..k+1 tokens: a
greedy row accepts proposals while the argmax agrees, then that argmax (identical tokens to
a run without them); a random row goes through rejection sampling against the filtered
target distribution (the Sampler's VerifyRows, kiln/spec/rejection.py). A step of decode
and verify rows runs as one-token rows, so it replays a decode CUDA graph
(`_as_decode_rows`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import EngineInfo
from kiln.kernels.ops import use_reference_kernels
from kiln.kernels.sampling import sample_gumbel
from kiln.runtime.cuda_graphs import CaptureReport, CudaGraphRunner, capture_sizes
from kiln.runtime.input_batch import BatchRow, InputBuffers, PrefillBucket
from kiln.runtime.prefill_graphs import PrefillGraphRunner, prefill_buckets
from kiln.parallel.sampled_ids import PipelineSampledIds, sampled_rows
from kiln.parallel.state import SINGLE_PROCESS, ParallelState
from kiln.runtime.kv_tensors import KVCacheSpec, allocate_kv_caches, apply_kv_scales
from kiln.runtime.memory_profile import MemoryProfile, cpu_kv_blocks, profile_kv_blocks
from kiln.runtime.messages import (
    PLACEHOLDER_TOKEN_ID,
    ModelRunnerOutput,
    SchedulerOutput,
    TokenLogprobs,
)
from kiln.runtime.runner_requests import RunnerRequests
from kiln.runtime.sampler import (
    LogprobsTensors,
    RequestGenerators,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    VerifyRows,
    to_token_logprobs,
)
from kiln.spec.rejection import emitted_tokens


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device; `ModelRunner.collect` turns it into a
    ModelRunnerOutput."""

    request_ids: list[str]  # the request of each sampled (logits) row, in order
    token_ids: torch.Tensor | None  # (L,) int64 on the host (pinned on CUDA), filled async
    logprobs: LogprobsTensors | None  # host copies, filled async
    num_logprobs: list[int | None]
    done: torch.cuda.Event | None  # recorded after the copies; None on the CPU
    started: torch.cuda.Event | None  # recorded before the step's first device work
    graphed: bool = False  # a decode step replayed from a CUDA graph
    # Requests whose rows verify speculative tokens: request id → the proposed tokens.
    verified: dict[str, list[int]] = field(default_factory=dict)
    # Of those, the random (not greedy) ones, verified by rejection sampling: their logits
    # rows hold the emitted tokens, then NO_TOKEN.
    rejection_sampled: set[str] = field(default_factory=set)
    # Set by execute_async(defer_sampling=True): the forward is queued, sampling waits for
    # `ModelRunner.sample_deferred` (structured outputs: the grammar mask is built meanwhile).
    deferred: "_DeferredSample | None" = None


@dataclass
class _DeferredSample:
    logits: torch.Tensor  # (L, V) on the device
    rows: list[BatchRow]
    graphed: bool


class ModelRunner:
    def __init__(
        self,
        engine_info: EngineInfo,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        num_kv_blocks: int | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_cuda_graphs: bool = True,
        gpu_memory_utilization: float = 0.9,
        cpu_kv_cache_bytes: int = 1 << 30,
        kv_cache_dtype: torch.dtype | None = None,
        parallel: ParallelState = SINGLE_PROCESS,
        agree_num_kv_blocks: Callable[[int], int] | None = None,
        share_sampled_ids: bool = False,
    ) -> None:
        """num_kv_blocks None: on CUDA, size the KV cache with a profiling forward
        (memory_profile.py) to fill gpu_memory_utilization of the device; on the CPU, fill
        cpu_kv_cache_bytes. kv_cache_dtype None: the compute dtype. `parallel`: which slice
        of the model this process holds (its rank file, its KV heads). `agree_num_kv_blocks`:
        with several ranks, turns this rank's fit into the one every rank uses (the smallest;
        kiln/parallel/executor.py). `share_sampled_ids` (tp > 1, overlap scheduling): the
        sampling rank broadcasts each step's sampled ids to its tp peers, which fill the next
        step's placeholders from them as it does."""
        self.engine_info = engine_info
        self.share_sampled_ids = share_sampled_ids
        # pp > 1: sampled ids of the steps the engine marks, last stage → stage 0.
        self.pipeline_ids = (PipelineSampledIds(parallel, device) if parallel.pp_size > 1
                             else None)
        self.device = device
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.parallel = parallel
        started = time.perf_counter()
        self.model = load_engine_model(engine_info, device, dtype, parallel=parallel)
        self.kv_cache_spec = KVCacheSpec.of_model(self.model, self.kv_cache_dtype)
        apply_kv_scales(self.model, engine_info.manifest.get("build", {}), self.kv_cache_dtype,
                        parallel)
        bytes_per_block = self.kv_cache_spec.bytes_per_block(block_size)
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
        # Never more than every sequence at full length needs (+1: the null block).
        max_blocks = max_num_seqs * max_blocks_per_seq + 1
        if num_kv_blocks is None and device.type == "cuda":
            self.memory_profile = profile_kv_blocks(
                self.model, device, self.kv_cache_spec, block_size, max_num_batched_tokens,
                max_num_seqs, gpu_memory_utilization, max_blocks, max_model_len,
            )
            num_kv_blocks = self.memory_profile.num_kv_blocks
        elif num_kv_blocks is None:
            num_kv_blocks = cpu_kv_blocks(cpu_kv_cache_bytes, bytes_per_block, max_blocks)
        if agree_num_kv_blocks is not None:
            num_kv_blocks = agree_num_kv_blocks(num_kv_blocks)
        self.num_kv_blocks = num_kv_blocks
        started = time.perf_counter()
        self.kv_caches = allocate_kv_caches(self.kv_cache_spec, num_kv_blocks, block_size, device)
        _sync(device)
        self.kv_allocation_seconds = time.perf_counter() - started
        self.sampler = Sampler()
        self.generators = RequestGenerators(device)
        self.requests = RunnerRequests()
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
        self.prefill_graphs: PrefillGraphRunner | None = None
        # Steps replayed from prefill graphs (a subset of the eager-shaped ones).
        self.prefill_graph_steps = 0
        self.capture_report: CaptureReport | None = None
        if enable_cuda_graphs and device.type == "cuda" and not use_reference_kernels():
            self.graphs = CudaGraphRunner(
                self.model, self.kv_caches, self.buffers, block_size, capture_sizes(max_num_seqs)
            )
            self.capture_report = self.graphs.capture()
            if parallel.world_size == 1:
                # Prefill/mixed-step graphs, single-process only: a pipeline stage's forward
                # returns hidden states, not logits, and its sends are host-driven.
                self.prefill_graphs = PrefillGraphRunner(
                    self.model, self.kv_caches, self.buffers, block_size,
                    prefill_buckets(self.buffers.max_num_tokens, max_num_seqs),
                )
                self.capture_report = self.capture_report.with_prefill(
                    self.prefill_graphs.capture(pool=self.graphs.pool, logits=self.graphs.logits)
                )
        if device.type == "cuda" and not use_reference_kernels() and parallel.is_driver:
            # Compile the temperature-only sampling kernels now rather than in the first
            # step that needs them (a second or two, inside someone's latency): for the
            # eager steps' float32 logits and the graphs' logits in the model dtype.
            vocab_size = self.model.lm_head.vocab_size
            for logits_dtype in {torch.float32, dtype}:
                sample_gumbel(torch.zeros(1, vocab_size, dtype=logits_dtype, device=device),
                              torch.ones(1, device=device),
                              torch.zeros(1, dtype=torch.bool, device=device), seed=0)

    def close(self) -> None:
        """Drop everything that holds device memory (graphs and their pool, KV cache,
        weights, buffers); the owner then releases the allocator's cache. Idempotent."""
        self.graphs = None
        self.prefill_graphs = None
        self.kv_caches = []
        self.model = None
        self.buffers = None
        self._last_sampled = None
        self._last_sampled_rows = {}
        if self.pipeline_ids is not None:
            self.pipeline_ids.close()
        self.requests.clear()
        self.generators.clear()

    def _as_decode_rows(self, rows: list[BatchRow]) -> list[BatchRow]:
        """A step of decode rows and verify rows ([last token, *proposals], logits at every
        token) as one-token rows: token i of a verify row becomes a decode row at position
        num_computed_tokens + i over the same block table. Every layer writes the whole
        step's K/V into the cache before its attention, so row i attends to the tokens
        before it exactly as the multi-token row would (the decode kernel reads the cache),
        and the step can replay a decode CUDA graph of batch × (1 + k) rows. Any other step
        (prefill chunks), or one past the input buffers' rows, is returned as it is."""
        if all(len(row.token_ids) == 1 for row in rows):
            return rows
        expanded: list[BatchRow] = []
        for row in rows:
            count = len(row.token_ids)
            if count == 1:
                expanded.append(row)
            elif len(row.logits_offsets) == count:  # a verify row: logits at every token
                first = row.num_computed_tokens
                expanded += [BatchRow(row.request_id, [token], first + index, row.block_ids,
                                      _ONE_TOKEN_LOGITS) for index, token in enumerate(row.token_ids)]
            else:
                return rows
        if len(expanded) > self.buffers.max_num_seqs:
            return rows
        return expanded

    def _graph_size(self, rows: list[BatchRow]) -> int | None:
        if self.graphs is None:
            return None
        if not all(len(row.token_ids) == 1 and row.logits_offsets for row in rows):
            return None
        return self.graphs.size_for(len(rows))

    def _prefill_bucket(self, rows: list[BatchRow]) -> PrefillBucket | None:
        if self.prefill_graphs is None:
            return None
        return self.prefill_graphs.bucket_for(rows)

    @torch.inference_mode()
    def forward_rows(
        self, rows: list[BatchRow], feed_token_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The logits (L, V) of rows built by the caller, not a step message: the draft
        model's forwards (kiln/spec/draft.py), which keep their own block tables.
        feed_token_ids (len(rows),) on the device replaces the ids of one-token rows (the
        previous draft step's argmax, never copied to the host). A decode-only batch replays
        a CUDA graph; its logits are a view the next replay overwrites. None when no row
        asks for logits."""
        graph_size = self._graph_size(rows)
        inputs = self.buffers.prepare(rows, self.block_size, pad_to=graph_size)
        if feed_token_ids is not None:
            inputs.input_ids[: len(rows)].copy_(feed_token_ids)
        if graph_size is not None:
            return self.graphs.replay(graph_size)[: inputs.num_seqs]
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        if not inputs.logits_request_ids:
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.execute_async(scheduler_output))

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput,
                      defer_sampling: bool = False) -> LaunchedStep:
        """defer_sampling: queue the forward only and return; `sample_deferred` then samples
        with a token bitmask the caller builds while the forward runs (structured outputs).
        The returned step's request_ids are its logits rows, in order."""
        if self.model is None:
            raise RuntimeError("the model runner is closed")
        for request_id in scheduler_output.finished_request_ids:
            self.generators.drop(request_id)
        rows = self.requests.apply(scheduler_output)
        if self.pipeline_ids is not None and (shared := self.pipeline_ids.take()) is not None:
            self._last_sampled, self._last_sampled_rows = shared  # pp: the marked step's
        if not rows:
            return LaunchedStep([], None, None, [], None, None)
        rows = _decode_rows_first(rows)
        # Verify rows as one-token rows (same logits rows, in the same order): a step of
        # decode and verify rows then replays a decode graph.
        forward_rows = self._as_decode_rows(rows)
        graph_size = self._graph_size(forward_rows)
        bucket = self._prefill_bucket(forward_rows) if graph_size is None else None
        inputs = self.buffers.prepare(forward_rows, self.block_size, pad_to=graph_size,
                                      prefill_bucket=bucket)
        if self.pipeline_ids is not None:
            self.pipeline_ids.expect(scheduler_output, rows, inputs.logits_request_ids)
        # After the host work of prepare(): the GPU time of a step should not count the GPU
        # waiting for this host.
        started = self._record_event()
        if self.parallel.is_first_stage:  # later stages take activations, not token ids
            self._fill_placeholders(forward_rows, inputs)
        if graph_size is not None:
            logits = self.graphs.replay(graph_size)[: inputs.num_seqs]  # (L, V) model dtype
        elif bucket is not None:
            self.prefill_graph_steps += 1
            logits = self.prefill_graphs.replay(bucket)[: len(inputs.logits_request_ids)]
            if not inputs.logits_request_ids:
                return LaunchedStep([], None, None, [], self._record_event(), started)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
            if not inputs.logits_request_ids or not self.parallel.is_last_stage:
                return LaunchedStep([], None, None, [], self._record_event(), started)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # (L, V) float32
        if not self.parallel.is_driver:  # a tp peer: it joined the logits' all-gather
            if self.share_sampled_ids:
                self._receive_sampled_ids(rows, inputs.logits_request_ids)
            return LaunchedStep([], None, None, [], self._record_event(), started)
        if defer_sampling:
            return LaunchedStep(inputs.logits_request_ids, None, None, [], None, started,
                                deferred=_DeferredSample(logits, rows, graph_size is not None))
        launched = self._sample(logits, rows, inputs.logits_request_ids, started)
        launched.graphed = graph_size is not None
        if self.pipeline_ids is not None:
            self.pipeline_ids.send(scheduler_output, self._last_sampled)
        return launched

    @torch.inference_mode()
    def sample_deferred(self, step: LaunchedStep,
                        token_bitmask: torch.Tensor | None) -> LaunchedStep:
        """Sample a step launched with defer_sampling, applying token_bitmask (host int32,
        one row per logits row, pinned on CUDA; None: nothing constrained). A step without
        logits rows is returned as it is."""
        deferred = step.deferred
        if deferred is None:
            return step
        launched = self._sample(deferred.logits, deferred.rows, step.request_ids, step.started,
                                token_bitmask)
        launched.graphed = deferred.graphed
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
        if not step.verified:  # one logits row per request
            return ModelRunnerOutput(
                sampled_token_ids={rid: [t] for rid, t in zip(step.request_ids, token_ids)},
                logprobs={
                    rid: [record] for rid, record in zip(step.request_ids, logprobs)
                    if record is not None
                },
            )
        sampled: dict[str, list[int]] = {}
        records: dict[str, list[TokenLogprobs]] = {}
        for rid, token_id, record in zip(step.request_ids, token_ids, logprobs):
            sampled.setdefault(rid, []).append(token_id)
            if record is not None:
                records.setdefault(rid, []).append(record)
        for rid, proposed in step.verified.items():
            if rid in step.rejection_sampled:
                sampled[rid] = emitted_tokens(sampled[rid])
            else:
                sampled[rid] = accept_matching(proposed, sampled[rid])
            if rid in records:
                del records[rid][len(sampled[rid]):]
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=records)

    def _record_event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _fill_placeholders(self, scheduled: list[BatchRow], inputs) -> None:
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

    def _receive_sampled_ids(self, rows: list[BatchRow], request_ids: list[str]) -> None:
        """A tp peer of the sampling rank: this step's sampled ids (its broadcast in _sample)
        and each request's row in them, as the sampling rank keeps them."""
        sampled = torch.empty(len(request_ids), dtype=torch.int64, device=self.device)
        self._last_sampled = self.parallel.broadcast_from_driver(sampled)
        self._last_sampled_rows = sampled_rows(rows, request_ids)

    def _sample(
        self,
        logits: torch.Tensor,  # (L, V): one row per logits offset of `rows`, in order
        rows: list[BatchRow],
        request_ids: list[str],  # (L,)
        started: torch.cuda.Event | None,
        token_bitmask: torch.Tensor | None = None,  # (L, ceil(V / 32)) int32 on the host
    ) -> LaunchedStep:
        sampling_rows = []
        verified: dict[str, list[int]] = {}
        # Random verify rows: (first logits row, proposals, generator) for rejection sampling.
        rejection: list[tuple[int, list[int], torch.Generator | None]] = []
        rejection_ids: set[str] = set()
        for row in rows:
            if not row.logits_offsets:
                continue
            request = self.requests[row.request_id]
            generator = self.generators.get(row.request_id, request.sampling_params)
            if len(row.logits_offsets) == 1:
                # Tokens sampled by earlier steps still in flight: this row's placeholders.
                # (This step's own sample is the one the row's logits give.)
                num_pending = row.num_computed_tokens + len(row.token_ids) - request.num_tokens
                sampling_rows.append(SamplingRow(
                    request.sampling_params, request.prompt_token_ids,
                    request.output_token_ids, request.eos_token_id, generator, num_pending,
                ))
                continue
            # A verify row: after the i-th proposed token, the outputs include the first i.
            proposed = row.token_ids[len(row.token_ids) - len(row.logits_offsets) + 1 :]
            verified[row.request_id] = proposed
            if not request.sampling_params.is_greedy:
                rejection.append((len(sampling_rows), proposed, generator))
                rejection_ids.add(row.request_id)
            for index in range(len(row.logits_offsets)):
                outputs = request.output_token_ids + proposed[:index]
                sampling_rows.append(SamplingRow(
                    request.sampling_params, request.prompt_token_ids, outputs,
                    request.eos_token_id, generator,
                ))
        metadata = SamplingMetadata.build(sampling_rows, logits.shape[-1], self.device,
                                          token_bitmask)
        verify = VerifyRows.build(rejection, self.device) if rejection else None
        sampled = self.sampler(logits, metadata, verify)
        if self.share_sampled_ids:
            self.parallel.broadcast_from_driver(sampled.sampled_token_ids)
        self._last_sampled = sampled.sampled_token_ids
        # Overlapped steps fill a request's placeholder from its row here; verify rows are
        # never followed by one (the scheduler waits for their outcome).
        self._last_sampled_rows = {rid: row for row, rid in enumerate(request_ids)
                                   if rid not in verified}
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
            verified=verified,
            rejection_sampled=rejection_ids,
        )


# A one-token row's logits: at its token. Shared, not built per row.
_ONE_TOKEN_LOGITS = (0,)


def accept_matching(proposed: list[int], sampled: list[int]) -> list[int]:
    """Verification by exact match: sampled[i] is the model's token after the first i
    proposed ones; keep proposals while the model agrees, then the model's own token (the
    bonus token when all agree). len(sampled) == len(proposed) + 1."""
    for index, token_id in enumerate(proposed):
        if sampled[index] != token_id:
            return sampled[: index + 1]
    return sampled


def _decode_rows_first(rows: list[BatchRow]) -> list[BatchRow]:
    """A mixed step's one-token (decode) rows first, each group in scheduler order, so
    attention can hand them to the decode kernel as one leading slice (input_batch.py marks
    it). Rows are matched to outputs by request id, so the order is the runner's own."""
    decode = [row for row in rows if len(row.token_ids) == 1]
    if len(decode) in (0, len(rows)):
        return rows
    return decode + [row for row in rows if len(row.token_ids) != 1]


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

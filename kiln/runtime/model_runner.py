"""Runs one SchedulerOutput through the model and the sampler.

    SchedulerOutput ─InputBuffers→ flat ragged tensors ─model→ hidden (T, H)
      ─hidden[logits_indices]→ logits (R, V) ─Sampler→ token ids ─one host copy→ ModelRunnerOutput

Decode-only steps on CUDA replay a captured graph (cuda_graphs.py); everything else runs
eagerly. The step's only device→host synchronisation is copying the sampled ids back.

The runner owns the model, the paged KV tensors, the persistent input buffers and the
per-request generators of seeded requests. It sees requests (sampling parameters, token
history) through `register`, which the engine calls when a request is added; `forget` drops
them (the engine calls it when a request ends; ids in a SchedulerOutput's finished list too).
"""

from __future__ import annotations

import torch

from kiln.build.engine import EngineInfo, load_engine_model
from kiln.kernels.ops import use_reference_kernels
from kiln.runtime.cuda_graphs import CaptureReport, CudaGraphRunner, capture_sizes
from kiln.runtime.input_batch import InputBuffers
from kiln.runtime.kv_tensors import allocate_kv_caches
from kiln.runtime.outputs import ModelRunnerOutput, SchedulerOutput
from kiln.runtime.request import Request
from kiln.runtime.sampler import RequestGenerators, Sampler, SamplingMetadata, SamplingRow, to_token_logprobs


class ModelRunner:
    def __init__(
        self,
        engine: EngineInfo,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        num_kv_blocks: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_cuda_graphs: bool = True,
    ) -> None:
        self.engine = engine
        self.device = device
        self.block_size = block_size
        self.model = load_engine_model(engine, device, dtype)
        self.kv_caches = allocate_kv_caches(
            engine.model_config, num_kv_blocks, block_size, dtype, device
        )
        self.buffers = InputBuffers(
            max_num_tokens=max(max_num_batched_tokens, max_num_seqs),
            max_num_seqs=max_num_seqs,
            max_blocks_per_seq=-(-max_model_len // block_size),
            device=device,
        )
        self.sampler = Sampler()
        self.generators = RequestGenerators(device)
        self._requests: dict[str, Request] = {}
        self.graphs: CudaGraphRunner | None = None
        self.capture_report: CaptureReport | None = None
        if enable_cuda_graphs and device.type == "cuda" and not use_reference_kernels():
            self.graphs = CudaGraphRunner(
                self.model, self.kv_caches, self.buffers, block_size, capture_sizes(max_num_seqs)
            )
            self.capture_report = self.graphs.capture()

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

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self.forget(request_id)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        graph_size = self._graph_size(scheduler_output)
        inputs = self.buffers.prepare(scheduler_output.scheduled, self.block_size, pad_to=graph_size)
        if graph_size is not None:
            logits = self.graphs.replay(graph_size)[: inputs.num_seqs]  # (R, V) float32
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
            if not inputs.sampled_request_ids:
                return ModelRunnerOutput(sampled_token_ids={})
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # (R, V) float32
        return self._sample(logits, inputs.sampled_request_ids)

    def _sample(self, logits: torch.Tensor, request_ids: list[str]) -> ModelRunnerOutput:
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
                )
            )
        metadata = SamplingMetadata.build(rows, logits.shape[-1], self.device)
        sampled = self.sampler(logits, metadata)
        token_ids = sampled.sampled_token_ids.tolist()  # the step's one device → host copy
        logprobs = to_token_logprobs(token_ids, sampled.logprobs, metadata.num_logprobs)
        return ModelRunnerOutput(
            sampled_token_ids={rid: [t] for rid, t in zip(request_ids, token_ids)},
            logprobs={
                rid: [record] for rid, record in zip(request_ids, logprobs) if record is not None
            },
        )

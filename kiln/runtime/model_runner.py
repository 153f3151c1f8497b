"""Runs one SchedulerOutput through the model and the sampler.

    SchedulerOutput ─prepare_inputs→ flat ragged tensors ─model→ hidden (T, H)
      ─hidden[logits_indices]→ logits (R, V) ─Sampler→ token ids ─one host copy→ ModelRunnerOutput

The runner owns the model, the paged KV tensors and the per-request generators of seeded
requests. It sees requests (sampling parameters, token history) through `register`, which
the engine calls when a request is added; ids in a SchedulerOutput's finished list are
forgotten.
"""

from __future__ import annotations

import torch

from kiln.build.engine import EngineInfo, load_engine_model
from kiln.runtime.input_batch import prepare_inputs
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
    ) -> None:
        self.engine = engine
        self.device = device
        self.block_size = block_size
        self.model = load_engine_model(engine, device, dtype)
        self.kv_caches = allocate_kv_caches(
            engine.model_config, num_kv_blocks, block_size, dtype, device
        )
        self.sampler = Sampler()
        self.generators = RequestGenerators(device)
        self._requests: dict[str, Request] = {}

    def register(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.generators.drop(request_id)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self.forget(request_id)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        inputs = prepare_inputs(scheduler_output.scheduled, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
        if not inputs.sampled_request_ids:
            return ModelRunnerOutput(sampled_token_ids={})
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # (R, V) float32

        rows = []
        for request_id in inputs.sampled_request_ids:
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
            sampled_token_ids={rid: [t] for rid, t in zip(inputs.sampled_request_ids, token_ids)},
            logprobs={
                rid: [record]
                for rid, record in zip(inputs.sampled_request_ids, logprobs)
                if record is not None
            },
        )

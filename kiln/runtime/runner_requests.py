"""The model runner's own copy of every request it has been told about, and the batch rows
each step's message turns into.

The runner imports nothing from the scheduler: everything here is built from step messages
(messages.py) alone, so it would be the same in a worker process that receives them as bytes.

    NewRequest            → a RunnerRequest (prompt, params, EOS id; no outputs, no blocks)
    ScheduledRequest      → its new output tokens and block ids applied, then one BatchRow:
                            tokens [num_computed_tokens, + num_scheduled_tokens) of
                            prompt + outputs, PLACEHOLDER_TOKEN_ID for tokens still in flight,
                            then the speculative tokens to verify
    finished_request_ids  → dropped

A preempted request keeps its entry: its outputs are still its outputs, and its next row
brings a whole new block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.runtime.input_batch import BatchRow
from kiln.runtime.messages import PLACEHOLDER_TOKEN_ID, ScheduledRequest, SchedulerOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.token_history import token_ids_between


@dataclass(slots=True)
class RunnerRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    # Committed output tokens, as the scheduler sent them (never the runner's own samples).
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class RunnerRequests:
    def __init__(self) -> None:
        self._requests: dict[str, RunnerRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __getitem__(self, request_id: str) -> RunnerRequest:
        return self._requests[request_id]

    def clear(self) -> None:
        self._requests.clear()

    def apply(self, scheduler_output: SchedulerOutput) -> list[BatchRow]:
        """Update the copies from one step message; the step's rows, in message order.
        Raises RuntimeError when the message does not fit what was sent before (a lost or
        reordered message)."""
        for request_id in scheduler_output.finished_request_ids:
            self._requests.pop(request_id, None)
        for new in scheduler_output.new_requests:
            if new.request_id in self._requests:
                raise RuntimeError(f"request {new.request_id!r} is already known to the runner")
            # The message's prompt list is the runner's from here on: nothing mutates it.
            self._requests[new.request_id] = RunnerRequest(
                new.request_id, new.prompt_token_ids, new.sampling_params, new.eos_token_id,
            )
        return [self._row(scheduled) for scheduled in scheduler_output.scheduled]

    def _row(self, scheduled: ScheduledRequest) -> BatchRow:
        request = self._requests.get(scheduled.request_id)
        if request is None:
            raise RuntimeError(f"request {scheduled.request_id!r} was scheduled before the "
                               f"runner was told of it")
        if scheduled.new_token_ids:
            request.output_token_ids += scheduled.new_token_ids
        block_ids = request.block_ids
        start = scheduled.new_block_ids_start
        if scheduled.new_block_ids or start != len(block_ids):
            if start > len(block_ids):
                raise RuntimeError(
                    f"request {scheduled.request_id!r}: new blocks start at {start}, but the "
                    f"runner holds {len(block_ids)}"
                )
            del block_ids[start:]
            block_ids += scheduled.new_block_ids
        first = scheduled.num_computed_tokens
        spec = scheduled.spec_token_ids
        end = first + scheduled.num_scheduled_tokens - len(spec)  # known + in-flight tokens
        prompt, outputs = request.prompt_token_ids, request.output_token_ids
        known_end = len(prompt) + len(outputs)
        token_ids = token_ids_between(prompt, outputs, first, min(end, known_end))
        if end > known_end:  # tokens sampled by steps still in flight (the row's last one)
            token_ids += [PLACEHOLDER_TOKEN_ID] * (end - max(first, known_end))
        if spec:
            token_ids = token_ids + spec
        return BatchRow(scheduled.request_id, token_ids, first, block_ids,
                        scheduled.logits_offsets)

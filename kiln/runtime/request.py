"""A request as the scheduler sees it: its tokens, how many of them have KV in the cache,
the blocks that hold that KV, and why it finished.

Schedule tokens, not phases: a request is just `num_tokens` (prompt + generated so far) and
`num_computed_tokens` (how many of those already have KV in the cache). Prefill, chunked
prefill, decode, preemption-by-recompute and prefix reuse are all "compute the next
`num_tokens - num_computed_tokens` tokens, some of them maybe for free from the cache".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kiln.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; goes back to the front of the waiting queue
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style finish reason, or None while the request is alive."""
        return self.value if self.is_finished else None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) and token counts of one request."""

    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_preemptions: int = 0


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens (of all_token_ids) whose KV is in the cache or is being computed by a step that
    # has been scheduled: the scheduler advances it when it schedules a chunk, so with
    # overlapped steps it runs ahead of what the GPU has finished. Reset to 0 on preemption.
    num_computed_tokens: int = 0
    # Tokens sampled (or being sampled) by scheduled steps whose ids the host does not know
    # yet. The next step feeds such a token to the model as a placeholder that the runner
    # fills on the device. 0 or 1 with synchronous steps; up to 2 when steps overlap.
    num_pending_tokens: int = 0
    # Physical KV block ids, in order: block i holds tokens [i*block_size, (i+1)*block_size).
    block_ids: list[int] = field(default_factory=list)
    # Proposed continuation tokens (a drafter's guess) to verify in the next step that
    # decodes this request; consumed when scheduled.
    spec_token_ids: list[int] = field(default_factory=list)
    # What the model runner already knows of this request (it keeps its own copy, built
    # from the step messages): how many output tokens and leading block ids were sent.
    num_synced_output_tokens: int = 0
    num_synced_blocks: int = 0
    # Stop reason detail: the stop token id or stop string that ended the request.
    stop_reason: int | str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    def __post_init__(self) -> None:
        self.metrics.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what the KV cache must eventually hold."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

"""The typed hand-offs of one engine step.

    Scheduler.schedule() ──SchedulerOutput──► ModelRunner.execute()
    ModelRunner.execute() ──ModelRunnerOutput──► Scheduler.update()

Plain data only: no tensors that live on a device, no references back into the scheduler,
so the runner can sit in another process (tensor parallelism) and the scheduler can be
tested on the CPU with fabricated runner outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of this step."""

    request_id: str
    # The tokens to run through the model now: all_token_ids[num_computed_tokens :
    # num_computed_tokens + len(token_ids)]. One token for a decode step, a whole prompt or a
    # chunk of one for (chunked) prefill, everything after the cached prefix on prefix reuse.
    token_ids: list[int]
    # Tokens of this request whose KV is already in the cache (the first position of
    # token_ids).
    num_computed_tokens: int
    # The request's whole block table (physical block ids), covering at least
    # num_computed_tokens + len(token_ids) tokens.
    block_ids: list[int]
    # True when this chunk reaches the end of the request's known tokens, so the logits of
    # its last position must be sampled. False for the non-final chunks of a chunked prefill.
    sample: bool

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the runner needs for one forward pass over a flat ragged batch."""

    scheduled: list[ScheduledRequest]
    # Requests preempted in this step (their blocks are already freed); the runner drops any
    # per-request state it kept for them.
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the last step; same use as above.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(r.num_scheduled_tokens for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one sampled position."""

    sampled_token_id: int
    sampled_logprob: float
    # The top-n (token id, logprob) pairs, best first; empty when n = 0.
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What one forward pass produced, keyed by request id."""

    # For each request whose ScheduledRequest had sample=True: the sampled token ids
    # (one per step today; 1+k accepted tokens with speculative decoding later).
    sampled_token_ids: dict[str, list[int]]
    # Per sampled token, when the request asked for logprobs.
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)

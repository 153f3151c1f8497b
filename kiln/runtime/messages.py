"""The typed hand-offs of one engine step, and nothing else.

    Scheduler.schedule() ──SchedulerOutput──► ModelRunner.execute()
    ModelRunner.execute() ──ModelRunnerOutput──► Scheduler.update()

Plain data only: ints, strings, lists, SamplingParams. No tensors, no references into the
scheduler, so the runner can sit in another process (tensor parallelism: `wire.py` encodes
these as msgpack, never pickle) and the scheduler can be tested with fabricated outputs.

The runner keeps its own state of every request it has seen, built from these messages:

    first step a request is scheduled   NewRequest: prompt, sampling params, EOS id
    every step it is scheduled          ScheduledRequest: a diff — output tokens committed
                                        since the runner last heard of it, block ids added
                                        (or the whole table after admission or preemption),
                                        where this step's tokens start, how many, which of
                                        them want logits
    once, when it ends                  its id in finished_request_ids

Output tokens have one source of truth, the scheduler: the runner's copy of a request's
outputs grows only by `new_token_ids`. Tokens a step has sampled but the scheduler has not
yet committed (overlapped steps) stand as PLACEHOLDER_TOKEN_ID in a row; the runner fills
them on the device from the previous step's sampled ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.runtime.sampling_params import SamplingParams

# Stands in a row for a token sampled by a step still in flight (overlap scheduling).
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True)
class NewRequest:
    """A request the runner has not seen yet: all it will ever need of it but its outputs."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # The model's EOS id (min_tokens bans it unless sampling_params.ignore_eos).
    eos_token_id: int | None


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's share of this step: what changed since the runner last heard of it,
    and which of its tokens to compute now.

    One is built per running request per step (a thousand a step at large batches), so its
    empty sequences are the shared `()`: every container allocated here brings Python's
    cyclic collector closer to its next pass, which showed up as host time per step."""

    request_id: str
    # Tokens of the request whose KV is already in the cache: the position of this row's
    # first token.
    num_computed_tokens: int
    # Tokens to compute in this row: one to decode, a prompt or a chunk of one for (chunked)
    # prefill, 1 + len(spec_token_ids) to verify speculative tokens.
    num_scheduled_tokens: int
    # Output tokens the scheduler committed since the last message about this request;
    # the runner appends them to its copy before reading this row's tokens.
    new_token_ids: Sequence[int] = ()
    # The block table changed from index new_block_ids_start on: the runner keeps its first
    # new_block_ids_start ids and appends new_block_ids (0 and the whole table after
    # admission or resumption; the old length when the table only grew).
    new_block_ids_start: int = 0
    new_block_ids: Sequence[int] = ()
    # Proposed tokens that follow the request's known tokens in this row, verified this
    # step: the row is [last known token, *spec_token_ids].
    spec_token_ids: Sequence[int] = ()
    # Offsets into this row whose logits are sampled, ascending: (num_scheduled_tokens - 1,)
    # when the row reaches the end of the request's known tokens, () for the non-final
    # chunks of a chunked prefill, the last 1 + len(spec_token_ids) offsets to verify.
    logits_offsets: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        return bool(self.logits_offsets)


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the runner needs for one forward pass over a flat ragged batch."""

    scheduled: list[ScheduledRequest]
    # Requests scheduled for the first time in this step (each also has a ScheduledRequest).
    new_requests: list[NewRequest] = field(default_factory=list)
    # Requests preempted in this step: their blocks are freed; the runner keeps their
    # state (outputs, random generator) for when they resume, with a whole new table.
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the last step: the runner drops them.
    finished_request_ids: list[str] = field(default_factory=list)
    # Pipeline parallelism with overlapped steps (set by the engine): the last stage sends
    # this step's sampled ids to stage 0, which takes them at the start of the next step
    # (whose placeholders they fill). Ignored at pp 1.
    share_sampled_ids: bool = False

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

    # For each request whose row had logits_offsets: the new tokens, in order. One for a
    # decode or a final prefill chunk; for a row verifying k speculative tokens, the
    # accepted ones plus the token sampled after them (1 to k + 1).
    sampled_token_ids: dict[str, list[int]]
    # Per new token, when the request asked for logprobs.
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)

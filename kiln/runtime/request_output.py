"""What the engine hands back to callers (vLLM-shaped): one RequestOutput per request per
step, holding the cumulative state of each of its n sequences and this step's delta."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.runtime.messages import TokenLogprobs
from kiln.runtime.request import RequestMetrics


@dataclass
class CompletionOutput:
    index: int  # which of the request's n sequences
    text: str  # all text so far
    token_ids: list[int]  # all generated token ids so far
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string, if any
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, when asked
    delta_text: str = ""  # text added by this step
    delta_token_ids: list[int] = field(default_factory=list)  # token ids added by this step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Per sequence, the same order as outputs.
    metrics: list[RequestMetrics] = field(default_factory=list)

    @property
    def num_cached_tokens(self) -> int:
        return max((m.num_cached_prompt_tokens for m in self.metrics), default=0)

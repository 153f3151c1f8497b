"""The one interface every proposer implements.

The engine asks, before scheduling a step, for up to k tokens that continue each request in
decode; the target model verifies them in that step (runtime/scheduler.py builds the
[last token, *proposals] rows, the runner accepts them: kiln/spec/rejection.py).

A proposer sees a request's committed tokens only (prompt + outputs the scheduler has
accepted), so whatever it proposed and the target rejected is simply absent next time: a
proposer with state of its own (the draft model's KV cache) rolls it back by comparing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple


class ProposalRequest(NamedTuple):
    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # How many tokens to propose at most (>= 1).
    num_tokens: int


class Proposer(ABC):
    # The proposer's cost per proposed token as a fraction of a target step (adaptive k).
    cost_per_token: float = 0.0

    @abstractmethod
    def propose(self, requests: Sequence[ProposalRequest]) -> dict[str, list[int]]:
        """Proposed continuations by request id (at most num_tokens each; a request may be
        missing or get fewer: nothing to propose)."""

    def drop(self, request_ids: Sequence[str]) -> None:
        """Forget finished or aborted requests (free what the proposer holds for them)."""

    def close(self) -> None:
        """Free the proposer's memory; idempotent."""

"""The engine's side of speculative decoding: before a step, ask the proposer for each
decoding request's next tokens (as many as adaptive k allows); after it, count what the
target accepted.

    engine step:  speculate = speculator.wants_to_speculate(running)
                  (an overlapped step in flight is collected first: proposals continue
                   tokens the host must know)
                  speculator.propose(running)     → Request.spec_token_ids
                  schedule → verify rows → runner accepts → update rolls back the rest
                  speculator.record(out, result)  → stats, per-request acceptance
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.runtime.messages import ModelRunnerOutput, SchedulerOutput
from kiln.runtime.request import Request, RequestStatus
from kiln.spec.adaptive import AdaptiveK
from kiln.spec.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from kiln.spec.proposer import ProposalRequest, Proposer


@dataclass
class SpeculationStats:
    """Counts since the engine started (read by the benchmarks and /metrics)."""

    num_verify_rows: int = 0  # rows that verified at least one proposed token
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    # accepted_length_counts[m]: verify rows that accepted m proposals (emitting m + 1).
    accepted_length_counts: list[int] = field(
        default_factory=lambda: [0] * (MAX_SPECULATIVE_TOKENS + 1)
    )

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed tokens (0 when nothing was proposed)."""
        return self.num_accepted_tokens / self.num_proposed_tokens if self.num_proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify row emits on average: accepted proposals + the target's own."""
        if not self.num_verify_rows:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_verify_rows

    def as_dict(self) -> dict:
        return {
            "num_verify_rows": self.num_verify_rows,
            "num_proposed_tokens": self.num_proposed_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
        }


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        cost = proposer.cost_per_token if config.method != "draft" else config.draft_cost
        self.adaptive = AdaptiveK(
            config.num_speculative_tokens, enabled=config.adaptive,
            ridge_tokens=config.ridge_tokens, proposer_cost=cost,
            disable_by_batch_size=config.disable_by_batch_size,
        )
        self.stats = SpeculationStats()
        self.max_model_len: int | None = None  # set by the engine

    def wants_to_speculate(self, running: Sequence[Request]) -> bool:
        """Whether some running request would propose this step (then the step runs
        synchronously: proposals continue the request's last token, which must be known)."""
        return self.adaptive.any_speculates([r.request_id for r in running], len(running))

    def propose(self, running: Sequence[Request]) -> None:
        """Fill spec_token_ids of the running requests that decode next and want k > 0."""
        batch_size = len(running)
        batch = []
        for request in running:
            if (request.status is not RequestStatus.RUNNING or request.num_pending_tokens
                    or request.num_computed_tokens != request.num_tokens - 1):
                continue  # in its prompt, or its last token is not known yet
            k = self.adaptive.choose(request.request_id, batch_size)
            # No more than max_tokens / max_model_len leave room for (verifying k adds k + 1).
            max_tokens = request.sampling_params.max_tokens
            if max_tokens is not None:
                k = min(k, max_tokens - request.num_output_tokens - 1)
            if self.max_model_len is not None:
                k = min(k, self.max_model_len - request.num_tokens - 1)
            if k > 0:
                batch.append(ProposalRequest(request.request_id, request.prompt_token_ids,
                                             request.output_token_ids, k))
        if not batch:
            return
        proposals = self.proposer.propose(batch)
        by_id = {request.request_id: request for request in running}
        for request_id, tokens in proposals.items():
            by_id[request_id].spec_token_ids = list(tokens)

    def step_launched(self) -> None:
        self.adaptive.next_step()

    def record(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        stats = self.stats
        for chunk in scheduler_output.scheduled:
            if not chunk.spec_token_ids:
                continue
            emitted = runner_output.sampled_token_ids.get(chunk.request_id)
            if not emitted:
                continue
            proposed = len(chunk.spec_token_ids)
            accepted = len(emitted) - 1
            stats.num_verify_rows += 1
            stats.num_proposed_tokens += proposed
            stats.num_accepted_tokens += accepted
            stats.accepted_length_counts[accepted] += 1
            self.adaptive.observe(chunk.request_id, proposed, accepted)

    def drop(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.adaptive.drop(request_id)
        self.proposer.drop(request_ids)

    def close(self) -> None:
        self.proposer.close()

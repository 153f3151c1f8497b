"""Sampled ids for the ranks that fill placeholders but do not sample (overlap scheduling
with several ranks).

Overlapped steps fill a placeholder (the token a step still in flight is sampling) on the
device from that step's sampled ids (ModelRunner._fill_placeholders). Only the sampling
rank (tp rank 0 of the last stage) samples; the ranks that embed tokens are stage 0's:

    pp 1, tp > 1   the sampling rank broadcasts every step's ids in its tp group
                   (ParallelState.broadcast_from_driver; ModelRunner.share_sampled_ids)
    pp > 1         only for steps the engine marks (SchedulerOutput.share_sampled_ids): the
                   sampling rank sends the ids to every stage 0 rank (pending sends), and
                   stage 0 receives them at the start of its next step, which the engine
                   always launches after a marked one. Unmarked steps cost nothing, so
                   micro-batches of disjoint requests never wait for each other.
"""

from __future__ import annotations

import torch

from kiln.parallel.state import ParallelState


def sampled_rows(rows, request_ids: list[str]) -> dict[str, int]:
    """Each request's row in a step's sampled ids, as the sampling rank keeps them: verify
    rows (several logits rows) are never followed by a placeholder."""
    verified = {row.request_id for row in rows if len(row.logits_offsets) > 1}
    return {rid: row for row, rid in enumerate(request_ids) if rid not in verified}


class PipelineSampledIds:
    """One rank's side of the last stage → stage 0 exchange (pp > 1)."""

    def __init__(self, parallel: ParallelState, device: torch.device) -> None:
        self.parallel = parallel
        self.device = device
        # Stage 0: (how many ids, each request's row) of the marked step before this one.
        self._expected: tuple[int, dict[str, int]] | None = None
        # The sampling rank: the sends of the last marked step. Stage 0 received them before
        # it ran the step after it, so before the next marked step reaches this rank.
        self._sending: list = []

    def expect(self, scheduler_output, rows, request_ids: list[str]) -> None:
        """Stage 0, after building a step's batch: a marked step's ids will come."""
        if (scheduler_output.share_sampled_ids and request_ids
                and self.parallel.is_first_stage):
            self._expected = (len(request_ids), sampled_rows(rows, request_ids))

    def take(self) -> tuple[torch.Tensor, dict[str, int]] | None:
        """Stage 0, at the start of every step: the marked previous step's ids and rows
        (None when it was not marked). On NCCL the receive waits on the stream, not here."""
        if self._expected is None:
            return None
        count, rows = self._expected
        self._expected = None
        ids = torch.empty(count, dtype=torch.int64, device=self.device)
        return self.parallel.receive_from_last_stage(ids), rows

    def send(self, scheduler_output, sampled_ids: torch.Tensor) -> None:
        """The sampling rank, after sampling: a marked step's ids to stage 0."""
        if not scheduler_output.share_sampled_ids:
            return
        for work in self._sending:
            work.wait()
        self._sending = self.parallel.send_to_first_stage(sampled_ids)

    def close(self) -> None:
        self._sending = []

"""Uniformly random proposals: the worst case a proposer can be (acceptance ~ 1/V). Used
by the benchmarks to show what speculation costs when it never pays, and that adaptive k
turns it off."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.spec.proposer import ProposalRequest, Proposer


class RandomProposer(Proposer):
    cost_per_token = 0.0

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)

    def propose(self, requests: Sequence[ProposalRequest]) -> dict[str, list[int]]:
        return {
            request.request_id: self._rng.integers(0, self.vocab_size, request.num_tokens).tolist()
            for request in requests
        }

"""Prompt lookup (n-gram) proposals: no model at all.

For each request, the last n tokens of prompt + outputs (n = ngram_max down to ngram_min)
are looked up earlier in the same tokens; at the most recent earlier occurrence, the k
tokens that followed it are the proposal. Copy-heavy tasks (rewrite, extract, edit a passage
given in the prompt) repeat long runs of the prompt, which this guesses exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.spec.proposer import ProposalRequest, Proposer


class NgramProposer(Proposer):
    cost_per_token = 0.0

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, requests: Sequence[ProposalRequest]) -> dict[str, list[int]]:
        proposals = {}
        for request in requests:
            tokens = np.fromiter(request.prompt_token_ids, dtype=np.int64,
                                 count=len(request.prompt_token_ids))
            if request.output_token_ids:
                tokens = np.concatenate([tokens, np.asarray(request.output_token_ids, np.int64)])
            proposal = lookup(tokens, self.ngram_min, self.ngram_max, request.num_tokens)
            if proposal:
                proposals[request.request_id] = proposal
        return proposals


def lookup(tokens: np.ndarray, ngram_min: int, ngram_max: int, k: int) -> list[int]:
    """The k tokens after the most recent earlier occurrence of the longest suffix of
    `tokens` (ngram_max down to ngram_min long) that occurs earlier; [] when none does."""
    length = len(tokens)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        # Windows tokens[i : i + n] for i + n < length (each has a token after it) that
        # equal the suffix: one vectorised comparison per suffix position.
        matches = tokens[: length - n] == tokens[length - n]
        for j in range(1, n):
            matches &= tokens[j : length - n + j] == tokens[length - n + j]
        found = np.flatnonzero(matches)
        if len(found):
            start = int(found[-1]) + n
            return tokens[start : start + k].tolist()
    return []

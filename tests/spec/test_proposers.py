"""The n-gram proposer's lookup and adaptive k's choices, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.spec.adaptive import AdaptiveK, best_k
from kiln.spec.ngram import NgramProposer, lookup
from kiln.spec.proposer import ProposalRequest


@pytest.mark.parametrize(("tokens", "ngram_min", "ngram_max", "k", "expected"), [
    ([1, 2, 3, 4, 5, 1, 2, 3], 1, 3, 3, [4, 5, 1]),  # the 3-gram [1 2 3] seen before
    ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 1, 3, 2, [9, 2]),  # longest n first: [1 2 3], not [2 3]
    ([5, 6, 1, 7, 6, 1, 8, 6, 1], 2, 2, 1, [8]),  # the most recent earlier occurrence
    ([1, 2, 3], 1, 3, 2, []),  # nothing repeats
    ([4, 4], 1, 2, 5, [4]),  # only the tokens that exist
    ([7, 1, 2, 7], 2, 4, 3, []),  # only a 1-gram repeats, below ngram_min
])
def test_lookup(tokens, ngram_min, ngram_max, k, expected):
    assert lookup(np.array(tokens), ngram_min, ngram_max, k) == expected


def test_ngram_proposer_reads_prompt_and_outputs():
    proposer = NgramProposer(1, 3)
    proposals = proposer.propose([
        ProposalRequest("a", [10, 11, 12, 13], [10, 11], 2),  # continues the prompt
        ProposalRequest("b", [1, 2, 3], [], 4),  # no repeat: no proposal
    ])
    assert proposals == {"a": [12, 13]}


def test_best_k_follows_acceptance_and_cost():
    assert best_k(0.0, 8, 0.0, 0.1) == 0
    assert best_k(0.95, 8, 0.001, 0.1) == 8  # cheap and accepted: all of them
    assert best_k(0.95, 8, 0.5, 0.1) < best_k(0.95, 8, 0.05, 0.1)  # dearer tokens: fewer
    assert best_k(0.6, 8, 1.0, 0.1) == 0  # compute-bound: never worth it
    ks = [best_k(rate / 10, 8, 0.02, 0.1) for rate in range(11)]
    assert ks == sorted(ks)  # more acceptance, never fewer proposals


def test_adaptive_k_backs_off_on_rejections_and_large_batches_and_probes():
    adaptive = AdaptiveK(4, probe_interval=8)
    adaptive.next_step()  # step 1: not a probing step
    assert adaptive.choose("r", 1) > 0  # the prior
    assert adaptive.choose("r", 512) == 0  # 512 verify rows per proposal: compute-bound
    for _ in range(10):
        adaptive.observe("r", 4, 0)
    assert adaptive.choose("r", 1) == 0 and not adaptive.any_speculates(["r"], 1)
    for _ in range(7):
        adaptive.next_step()
    assert adaptive.probing and adaptive.choose("r", 1) == 1  # one step in 8 probes
    for _ in range(10):
        adaptive.observe("r", 4, 4)
    adaptive.next_step()
    assert adaptive.choose("r", 1) == 4
    adaptive.drop("r")
    assert adaptive.acceptance_rate("r") == adaptive.prior


def test_disable_by_batch_size_and_adaptive_off():
    adaptive = AdaptiveK(3, enabled=False, disable_by_batch_size=16)
    adaptive.next_step()
    for _ in range(10):
        adaptive.observe("r", 3, 0)
    assert adaptive.choose("r", 1) == 3  # not adaptive: always k
    assert adaptive.choose("r", 16) == 0 and not adaptive.any_speculates(["r"], 16)

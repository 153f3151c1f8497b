"""Rejection sampling (kiln/spec/rejection.py) preserves the target distribution: chi-square
tests over >= 20,000 draws on a tiny vocabulary, with drafts that have probabilities and
with point-mass drafts, at temperature 1 and after top-k / top-p; and the same test rejects
deliberately wrong acceptance rules, so it has the power to catch one."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime.sampler import Sampler, SamplingMetadata, SamplingRow, VerifyRows
from kiln.runtime.sampling_params import SamplingParams
from kiln.spec.rejection import NO_TOKEN, emitted_tokens, rejection_sample

VOCAB = 5
K = 3
DRAWS = 20_000


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probabilities (cells with zero expected
    mass must have zero counts, else p = 0)."""
    total = counts.sum()
    expected = expected_probs * total
    support = expected > 0
    if (counts[~support] > 0).any():
        return 0.0
    statistic = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         statistic.double() / 2))


def position_distributions(seed: int, sharp: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(K + 2, VOCAB, generator=generator) * sharp, dim=-1)


def generate_two_tokens(sample_fn, p: torch.Tensor, q: torch.Tensor | None, seed: int):
    """DRAWS independent sequences of a position-only 'model' (p[i] at position i) decoded
    speculatively until each has 2 tokens: the first two tokens of each."""
    torch.manual_seed(seed)
    batch = DRAWS
    tokens = torch.full((batch, 2), -1, dtype=torch.int64)
    length = torch.zeros(batch, dtype=torch.int64)
    while (length < 2).any():
        active = torch.nonzero(length < 2).squeeze(1)
        start = length[active]  # position of each active sequence's next token
        positions = start.unsqueeze(1) + torch.arange(K + 1)  # (B, K + 1)
        target = p[positions]  # (B, K + 1, V)
        if q is None:  # point masses: the drafts are the proposer's fixed guesses
            drafts = (positions[:, :K] * 2 + 1) % VOCAB
            draft_probs = None
        else:
            draft_probs = q[positions[:, :K]]  # (B, K, V)
            drafts = torch.multinomial(draft_probs.reshape(-1, VOCAB), 1).view(-1, K)
        emitted = sample_fn(target, drafts, torch.full((len(active),), K), draft_probs)
        for column in range(2):
            take = (start == column) | ((start == 0) & (column == 1))
            source = column - start
            valid = take & (source >= 0) & (emitted[torch.arange(len(active)), source.clamp(0, K)] != NO_TOKEN)
            rows = active[valid]
            tokens[rows, column] = emitted[valid, source[valid]]
        length[active] = (tokens[active] != -1).sum(dim=1)
    return tokens


def joint_counts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB).double()


def joint_expected(p: torch.Tensor) -> torch.Tensor:
    return (p[0].unsqueeze(1) * p[1].unsqueeze(0)).reshape(-1).double()


def accept_always(target, drafts, num_draft, draft_probs):
    """Wrong: every proposal accepted, then a bonus token from p."""
    batch = target.shape[0]
    output = torch.full((batch, K + 1), NO_TOKEN, dtype=torch.int64)
    output[:, :K] = drafts
    output[:, K] = torch.multinomial(target[:, K], 1).squeeze(1)
    return output


def no_residual(target, drafts, num_draft, draft_probs):
    """Wrong: the right acceptance test, but a rejected position resamples from p (the
    residual max(0, p - q) left out)."""
    output = rejection_sample(target, drafts, num_draft, draft_probs)
    for row in range(target.shape[0]):
        tokens = emitted_tokens(output[row].tolist())
        position = len(tokens) - 1
        if position < K:  # a rejection: replace the recovered token by a draw from p
            output[row, position] = torch.multinomial(target[row, position], 1)
    return output


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft-probs", "point-mass"])
def test_the_first_two_tokens_follow_the_target_distribution(with_draft_probs):
    p = position_distributions(0)
    q = position_distributions(1) if with_draft_probs else None
    tokens = generate_two_tokens(rejection_sample, p, q, seed=2)
    assert chi_square_p_value(joint_counts(tokens), joint_expected(p)) > 1e-3


@pytest.mark.parametrize("wrong_rule", [accept_always, no_residual], ids=["accept-always", "no-residual"])
def test_the_same_test_rejects_a_wrong_acceptance_rule(wrong_rule):
    p = position_distributions(0, sharp=2.0)
    q = position_distributions(1, sharp=2.0)
    if wrong_rule is no_residual:  # a python loop per row: a smaller sample still fails it
        global DRAWS
        saved, DRAWS = DRAWS, 4_000
        try:
            tokens = generate_two_tokens(wrong_rule, p, q, seed=3)
        finally:
            DRAWS = saved
    else:
        tokens = generate_two_tokens(wrong_rule, p, q, seed=3)
    assert chi_square_p_value(joint_counts(tokens), joint_expected(p)) < 1e-6


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=4, top_p=0.9, min_p=0.05),
], ids=["t1", "top-k", "top-p", "all-filters"])
def test_the_sampler_verifies_against_its_filtered_distribution(params):
    """Through the Sampler's verify path (VerifyRows): a request's k + 1 logits rows with
    point-mass proposals; the first emitted token must follow softmax(filtered logits / T)
    computed independently here."""
    torch.manual_seed(4)
    vocab = 6
    logits = torch.randn(K + 1, vocab) * 1.5
    proposals = [2, 0, 5]
    rows = [SamplingRow(params, [1, 2], [3] + proposals[:i]) for i in range(K + 1)]
    batch = 2000  # requests per call, each with its own k + 1 logits rows
    metadata = SamplingMetadata.build(rows * batch, vocab, "cpu")
    verify = VerifyRows.build([((K + 1) * i, proposals, None) for i in range(batch)],
                              torch.device("cpu"))
    counts = torch.zeros(vocab, dtype=torch.float64)
    for _ in range(DRAWS // batch):
        sampled = Sampler()(logits.repeat(batch, 1), metadata, verify).sampled_token_ids
        first = sampled.view(batch, K + 1)[:, 0]
        counts += torch.bincount(first, minlength=vocab).double()
    expected = reference_filtered(logits[0], params)
    assert chi_square_p_value(counts, expected) > 1e-3


def reference_filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """softmax(logits / T) cut to the top-k, renormalised, cut to the smallest top set
    holding >= top_p, renormalised, then min-p: what non-speculative sampling draws from
    (vLLM's order)."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    if params.top_k != -1:
        order = order[: params.top_k]
    top_k_mass = sum(float(probs[t]) for t in order)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    total = 0.0
    for token in order:
        keep[token] = True
        total += float(probs[token]) / top_k_mass
        if total >= params.top_p:
            break
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    kept = kept / kept.sum()
    if params.min_p > 0:
        kept = torch.where(kept >= params.min_p * kept.max(), kept, torch.zeros_like(kept))
    return kept / kept.sum()


def test_seeded_rows_are_reproducible_and_output_is_well_formed():
    p = position_distributions(5).unsqueeze(0).repeat(8, 1, 1)[:, : K + 1]
    drafts = torch.randint(0, VOCAB, (8, K))
    num_draft = torch.tensor([3, 2, 0, 1, 3, 3, 2, 1])
    runs = []
    for _ in range(2):
        generators = {row: torch.Generator().manual_seed(row) for row in range(8)}
        torch.manual_seed(torch.seed())  # the shared generator differs between the runs
        runs.append(rejection_sample(p, drafts, num_draft, None, generators))
    assert torch.equal(runs[0], runs[1])
    for row, count in enumerate(num_draft.tolist()):
        tokens = emitted_tokens(runs[0][row].tolist())
        assert 1 <= len(tokens) <= count + 1
        assert tokens[:-1] == drafts[row, : len(tokens) - 1].tolist()
        assert all(t == NO_TOKEN for t in runs[0][row, len(tokens):].tolist())


def test_a_certain_proposal_is_always_accepted_and_an_impossible_one_never():
    p = torch.zeros(2, K + 1, VOCAB)
    p[0, :, 1] = 1.0  # the target is sure of token 1 everywhere
    p[1, :, 2] = 1.0  # ... of token 2
    drafts = torch.tensor([[1, 1, 1], [1, 1, 1]])
    out = rejection_sample(p, drafts, torch.tensor([3, 3]))
    assert out[0].tolist() == [1, 1, 1, 1]  # all accepted + bonus
    assert out[1].tolist() == [2, NO_TOKEN, NO_TOKEN, NO_TOKEN]  # rejected, residual = 2

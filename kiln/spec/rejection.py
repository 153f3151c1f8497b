"""Verification of proposed tokens against the target model: Leviathan et al. / Chen et al.
speculative sampling, torch reference (the work is a few (B, V) passes; no kernel needed).

For one request with k proposals x_1..x_k drawn from the proposer's distributions q_i and
the target's distributions p_1..p_{k+1} (after penalties, temperature, top-k, top-p, min-p:
exactly what non-speculative sampling would draw from at each position):

    for i = 1..k:  accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
                   on the first rejection emit one token from the residual
                   norm(max(0, p_i - q_i)) and stop
    all accepted:  emit a bonus token from p_{k+1}

Each emitted token is then distributed exactly as p at its position given the tokens before
it, so the output distribution is that of sampling without speculation. A proposer without
probabilities (n-gram lookup, greedy drafts) proposes a point mass: q_i = one-hot(x_i), the
acceptance probability is p_i(x_i) and the residual is p_i with x_i removed, renormalised.
That is the same law as "sample y_i ~ p_i, accept while y_i == x_i, else emit y_i", which
is how the runner verifies greedy rows (argmax, so exact match) and rows without draft
probabilities.

Randomness: one uniform per proposal and one exponential race over the vocabulary per
request. A seeded request draws both from its own generator, in a fixed amount per step, so
its tokens are reproducible whatever the batch around it.
"""

from __future__ import annotations

import torch

# Marks the positions after a request's last emitted token.
NO_TOKEN = -1


def rejection_sample(
    target_probs: torch.Tensor,  # (B, K + 1, V) float32, each row sums to 1
    draft_token_ids: torch.Tensor,  # (B, K) int64 (padding past num_draft: any id)
    num_draft: torch.Tensor,  # (B,) int64 in [0, K]: each request's proposals
    draft_probs: torch.Tensor | None = None,  # (B, K, V); None: point masses at the drafts
    generators: dict[int, torch.Generator] | None = None,  # batch row → its generator
) -> torch.Tensor:
    """(B, K + 1) int64: each request's accepted proposals, then the recovered or bonus token,
    then NO_TOKEN. A request emits between 1 and num_draft + 1 tokens."""
    batch, width, vocab = target_probs.shape
    k = width - 1
    device = target_probs.device
    uniforms = torch.rand(batch, max(k, 1), device=device)  # (B, K)
    exponentials = torch.empty(batch, vocab, device=device).exponential_()  # (B, V)
    for row, generator in (generators or {}).items():
        uniforms[row] = torch.rand(max(k, 1), device=device, generator=generator)
        exponentials[row].exponential_(generator=generator)
    uniforms = uniforms[:, :k]
    rows = torch.arange(batch, device=device)
    positions = torch.arange(k, device=device)  # (K,)
    drafts = draft_token_ids.clamp(min=0)  # (B, K)
    proposed = positions < num_draft.unsqueeze(1)  # (B, K)
    p_draft = target_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, K)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, K)
    # u < p / q, without dividing by a q that might be 0 for a malformed proposal.
    accepted = (uniforms * q_draft < p_draft) & proposed  # (B, K)
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # (B,) leading acceptances
    rejected = num_accepted < num_draft  # (B,)

    final_p = target_probs[rows, num_accepted]  # (B, V): p at the first unaccepted position
    if k:
        at = num_accepted.clamp(max=k - 1)
        if draft_probs is None:
            final_q = torch.zeros_like(final_p)
            final_q[rows, drafts[rows, at]] = 1.0
        else:
            final_q = draft_probs[rows, at]  # (B, V)
        residual = (final_p - final_q).clamp_min(0)
        # p == q leaves no residual mass (acceptance was then certain, up to rounding).
        has_mass = residual.sum(dim=1, keepdim=True) > 0
        residual = torch.where(has_mass, residual, final_p)
        final_p = torch.where(rejected.unsqueeze(1), residual, final_p)
    # Exponential race: argmax p / E picks i with probability p_i / sum(p), normalised or not.
    final_tokens = (final_p / exponentials.clamp_min(torch.finfo(torch.float32).tiny)).argmax(1)

    output = torch.full((batch, width), NO_TOKEN, dtype=torch.int64, device=device)
    if k:
        keep = positions < num_accepted.unsqueeze(1)
        output[:, :k] = torch.where(keep, drafts, torch.full_like(drafts, NO_TOKEN))
    output[rows, num_accepted] = final_tokens
    return output


def emitted_tokens(row: list[int]) -> list[int]:
    """One request's row of rejection_sample's output as the tokens it emits."""
    end = row.index(NO_TOKEN) if NO_TOKEN in row else len(row)
    return row[:end]

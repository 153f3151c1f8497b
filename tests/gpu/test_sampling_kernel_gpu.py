"""The Gumbel-max sampling kernel at Llama-3's vocabulary (V = 128256) on the GPU: greedy rows
are exactly torch.argmax, random rows draw from softmax(logits / T), draws are reproducible and
independent of the grid, and the sampler takes the kernel for temperature-only batches.
Importable everywhere; tests/gpu/conftest.py skips it where CUDA is absent.
"""

from __future__ import annotations

import math

import pytest
import torch

from kiln.kernels import sampling
from kiln.kernels.sampling import sample_gumbel
from kiln.runtime.sampler import Sampler, SamplingMetadata, SamplingRow
from kiln.runtime.sampling_params import SamplingParams

VOCAB = 128256
# Bretagnolle–Huber–Carol: P(||p_hat - p||_1 >= eps) <= 2^k exp(-N eps^2 / 2) for k outcomes
# and N draws; at failure probability 1e-6 the total variation stays below this.
FAILURE_PROBABILITY = 1e-6


def tv_bound(num_outcomes: int, num_samples: int) -> float:
    return 0.5 * math.sqrt(
        2 * (num_outcomes * math.log(2) + math.log(1 / FAILURE_PROBABILITY)) / num_samples
    )


def _random_logits(num_rows: int, dtype: torch.dtype, seed: int, ties: bool) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    if ties:
        # Integers in [-20, 20]: each row's maximum appears ~3,000 times, in every split.
        return torch.randint(-20, 21, (num_rows, VOCAB), generator=generator,
                             device="cuda").to(dtype)
    return (torch.randn(num_rows, VOCAB, generator=generator, device="cuda") * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 64, 512])
@pytest.mark.parametrize("ties", [False, True], ids=["normal", "ties"])
def test_greedy_rows_are_torch_argmax(num_rows, dtype, ties):
    logits = _random_logits(num_rows, dtype, seed=num_rows, ties=ties)
    greedy = torch.ones(num_rows, dtype=torch.bool, device="cuda")
    greedy[1::2] = False  # mixed batch: odd rows sample
    temperatures = torch.ones(num_rows, device="cuda")
    tokens = sample_gumbel(logits, temperatures, greedy, seed=3)
    expected = logits.argmax(dim=-1)
    assert tokens.dtype == torch.int64 and tokens.shape == (num_rows,)
    assert torch.equal(tokens[greedy], expected[greedy])
    assert bool(((tokens >= 0) & (tokens < VOCAB)).all())
    # Rows sliced out of a wider buffer, as the CUDA-graph logits buffer is.
    buffer = torch.empty(num_rows + 3, VOCAB + 64, dtype=dtype, device="cuda")
    buffer[2 : 2 + num_rows, :VOCAB] = logits
    view = buffer[2 : 2 + num_rows, :VOCAB]
    assert torch.equal(sample_gumbel(view, temperatures, greedy, seed=3), tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.8])
def test_distribution_at_a_small_vocabulary(dtype, temperature):
    # 1,000,000 draws of a 32-token distribution, one row each: TV < 0.0042.
    num_samples, vocab_size = 1_000_000, 32
    generator = torch.Generator(device="cuda").manual_seed(7)
    row = (torch.randn(vocab_size, generator=generator, device="cuda") * 1.5).to(dtype)
    row[5] = float("-inf")
    logits = row.expand(num_samples, -1).contiguous()  # (N, 32)
    temperatures = torch.full((num_samples,), temperature, device="cuda")
    greedy = torch.zeros(num_samples, dtype=torch.bool, device="cuda")
    tokens = sample_gumbel(logits, temperatures, greedy, seed=11)
    counts = torch.bincount(tokens, minlength=vocab_size).double()
    expected = torch.softmax(row.double() / temperature, dim=0)
    assert counts[5] == 0
    total_variation = 0.5 * (counts / num_samples - expected).abs().sum().item()
    assert total_variation < tv_bound(vocab_size, num_samples), total_variation


@pytest.mark.parametrize("temperature", [0.6, 1.8])
@pytest.mark.parametrize("num_splits", [None, 63], ids=["default", "63-splits"])
def test_distribution_at_the_full_vocabulary(temperature, num_splits):
    """16 likely tokens spread over the vocabulary (in different splits, at split edges and
    the last column) holding 70 % of the mass; the other 128,240 share 30 % and count as one
    outcome. 200,000 draws from one row repeated with stride 0: TV < 0.008."""
    num_samples = 200_000
    generator = torch.Generator(device="cuda").manual_seed(5)
    hot = torch.tensor([0, 3, 2047, 2048, 8191, 30000, 64127, 64128, 65536, 90001, 100000,
                        120000, 126975, 126976, 128254, 128255], device="cuda")
    hot_probs = torch.softmax(torch.randn(16, generator=generator, device="cuda"), 0) * 0.7
    probs = torch.full((VOCAB,), 0.3 / (VOCAB - 16), dtype=torch.float64, device="cuda")
    probs[hot] = hot_probs.double()
    # softmax(logits / T) = probs; bf16 rounding moves it, so the target is recomputed.
    row = (temperature * probs.log()).to(torch.bfloat16)
    target = torch.softmax(row.double() / temperature, 0)
    logits = row.expand(num_samples, -1)  # (N, V), stride(0) = 0
    temperatures = torch.full((num_samples,), temperature, device="cuda")
    greedy = torch.zeros(num_samples, dtype=torch.bool, device="cuda")
    tokens = sample_gumbel(logits, temperatures, greedy, seed=17, num_splits=num_splits)
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    observed = torch.cat([counts[hot], (counts.sum() - counts[hot].sum()).view(1)]) / num_samples
    expected = torch.cat([target[hot], (1 - target[hot].sum()).view(1)])
    total_variation = 0.5 * (observed - expected).abs().sum().item()
    assert total_variation < tv_bound(17, num_samples), total_variation


@pytest.mark.parametrize("num_rows", [1, 64, 512])
def test_draws_are_reproducible_and_independent_of_the_grid(num_rows):
    logits = _random_logits(num_rows, torch.bfloat16, seed=100 + num_rows, ties=False)
    # T = 3 flattens the N(0, 9) logits to N(0, 1) ones: the likeliest token has p ~ 4e-4.
    temperatures = torch.full((num_rows,), 3.0, device="cuda")
    greedy = torch.zeros(num_rows, dtype=torch.bool, device="cuda")
    tokens = sample_gumbel(logits, temperatures, greedy, seed=2024)
    assert torch.equal(sample_gumbel(logits, temperatures, greedy, seed=2024), tokens)
    for num_splits in (1, 16, sampling.MAX_SPLITS):
        assert torch.equal(
            sample_gumbel(logits, temperatures, greedy, seed=2024, num_splits=num_splits), tokens
        ), num_splits
    assert torch.equal(sample_gumbel(logits, temperatures, greedy, seed=2024, block=512), tokens)
    other = sample_gumbel(logits, temperatures, greedy, seed=2025)
    # Two seeds agree on a row with probability sum(p^2) ~ e / V ~ 2e-5.
    assert (other != tokens).float().mean().item() > 0.9
    if num_rows > 1:
        # Row 0 keeps its token whatever the other rows hold.
        changed = logits.clone()
        changed[1:] = changed[1:].flip(-1)
        assert sample_gumbel(changed, temperatures, greedy, seed=2024)[0] == tokens[0]


def test_tiny_temperature_is_argmax():
    logits = _random_logits(64, torch.float32, seed=9, ties=False)
    temperatures = torch.full((64,), 1e-5, device="cuda")
    greedy = torch.zeros(64, dtype=torch.bool, device="cuda")
    assert torch.equal(sample_gumbel(logits, temperatures, greedy, seed=1),
                       logits.argmax(dim=-1))


def test_minus_inf_is_never_drawn_and_dead_rows_stay_in_range():
    logits = _random_logits(64, torch.bfloat16, seed=10, ties=False)
    logits[:, ::2] = float("-inf")
    logits[7] = float("-inf")  # nothing allowed
    temperatures = torch.ones(64, device="cuda")
    greedy = torch.zeros(64, dtype=torch.bool, device="cuda")
    for seed in range(5):
        tokens = sample_gumbel(logits, temperatures, greedy, seed=seed)
        assert tokens[7] == 0
        assert bool((tokens[torch.arange(64, device="cuda") != 7] % 2 == 1).all())


def test_sampler_takes_the_kernel_for_temperature_only_batches(monkeypatch):
    calls = []
    real = sampling.sample_gumbel

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_gumbel", spy)
    logits = _random_logits(8, torch.float32, seed=12, ties=False)
    rows = [SamplingRow(SamplingParams(temperature=0.0 if i % 2 else 0.8), [1], [])
            for i in range(8)]
    metadata = SamplingMetadata.build(rows, VOCAB, "cuda")
    out = Sampler()(logits, metadata)
    assert len(calls) == 1 and calls[0][0] is logits
    assert torch.equal(out.sampled_token_ids[1::2], logits.argmax(-1)[1::2])
    monkeypatch.setenv("KILN_REFERENCE_KERNELS", "1")
    Sampler()(logits, metadata)
    assert len(calls) == 1  # the torch path

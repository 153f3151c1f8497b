"""The Gumbel-max sampling kernel against a numpy model of its noise and against torch, and the
sampler's choice of it.

Under Triton's interpreter a program with Philox costs ~20 ms, too slow for the thousands of
draws a distribution check needs. So the kernel is checked draw for draw against a numpy
oracle that computes the documented noise (Philox4x32-10 keyed by the seed, counter
(col // 4, row), then the kernel's Exponential transform) in the same float32 operations, and
the oracle's distribution is checked at 40,000 draws. tests/gpu checks the kernel's own
distribution at real shapes. On a CUDA machine these tests run the kernel on the GPU.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kiln.kernels import sampling
from kiln.kernels.sampling import (
    _exponential,
    philox_key,
    sample_gumbel,
    sample_gumbel_reference,
)
from kiln.runtime import sampler as sampler_module
from kiln.runtime.sampler import Sampler, SamplingMetadata, SamplingRow
from kiln.runtime.sampling_params import SamplingParams

# The interpreter turns a loop bound loaded from memory into an int through a 1-element array,
# which numpy deprecates; nothing of ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


# ----------------------------------------------------------------------------------------
# The oracle: the kernel's noise, in numpy

_MASK32 = np.uint64(0xFFFFFFFF)
LOG2_E = math.log2(math.e)


def _philox4x32_10(c0: np.ndarray, c1: np.ndarray, key: int) -> list[np.ndarray]:
    """Philox4x32-10 as triton.language.random computes it: counter (c0, c1, 0, 0), key
    (low word, high word)."""
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    c0, c1 = c0.astype(np.uint64), c1.astype(np.uint64)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        product_b, product_a = round_b * c2, round_a * c0  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (
            (product_b >> np.uint64(32)) ^ c1 ^ k0, product_b & _MASK32,
            (product_a >> np.uint64(32)) ^ c3 ^ k1, product_a & _MASK32,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return [c.astype(np.uint32) for c in (c0, c1, c2, c3)]


def _exponential_numpy(bits: np.ndarray) -> np.ndarray:
    """sampling._exponential, operation for operation in float32."""
    with np.errstate(divide="ignore"):
        v = (bits.astype(np.float32) + np.float32(0.5)) * np.float32(2.3283064365386963e-10)
        series = v * (1.0 + v * (0.5 + v * (0.3333333333 + v * 0.25))) * np.float32(LOG2_E)
        return np.where(v < 0.015625, series, -np.log2(np.float32(1.0) - v))


def oracle_scores(logits: torch.Tensor, temperatures: torch.Tensor, greedy: torch.Tensor,
                  seed: int) -> np.ndarray:
    """(R, V) float32 scores as the kernel computes them; NaN already mapped to -inf."""
    x = logits.float().cpu().numpy()
    num_rows, vocab_size = x.shape
    rows = np.repeat(np.arange(num_rows, dtype=np.uint64), vocab_size)
    cols = np.tile(np.arange(vocab_size, dtype=np.uint64), num_rows)
    words = _philox4x32_10(cols // np.uint64(4), rows, philox_key(seed))
    lane = (cols % np.uint64(4)).astype(np.int64)
    bits = np.choose(lane, words).reshape(num_rows, vocab_size)
    scale = np.float32(LOG2_E) / temperatures.cpu().numpy()[:, None]  # (R, 1)
    with np.errstate(invalid="ignore"):
        scores = x * scale - np.log2(_exponential_numpy(bits))
    scores = np.where(greedy.cpu().numpy()[:, None], x, scores)
    return np.where(np.isnan(scores), np.float32(-np.inf), scores)


def oracle_tokens(logits, temperatures, greedy, seed) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, margin): the oracle's argmax (first among equals) and its lead over the next
    best score, below which the GPU's approximate log2 may pick the other one."""
    scores = oracle_scores(logits, temperatures, greedy, seed)
    top2 = -np.sort(-scores, axis=1)[:, :2]
    with np.errstate(invalid="ignore"):
        return scores.argmax(axis=1), top2[:, 0] - top2[:, 1]


def assert_matches_oracle(tokens: torch.Tensor, logits, temperatures, greedy, seed) -> None:
    expected, margin = oracle_tokens(logits, temperatures, greedy, seed)
    tokens = tokens.cpu().numpy()
    # Under the interpreter the kernel's float32 ops are these numpy ops: equal everywhere. On
    # the GPU log2 is approximate (~2^-22 absolute): allow a flip only within 1e-4 of a tie.
    exact = tokens == expected
    assert np.all(exact | (margin < 1e-4)), (tokens, expected, margin)


# ----------------------------------------------------------------------------------------
# Kernel: greedy rows, the noise, reproducibility


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_rows_are_torch_argmax_with_ties_to_the_lowest_index(dtype, device):
    torch.manual_seed(0)
    # Integer logits in [-3, 3]: every row's maximum is tied across many columns and splits.
    logits = torch.randint(-3, 4, (4, 200)).to(dtype).to(device)
    greedy = torch.ones(4, dtype=torch.bool, device=device)  # mixed batches: tests below
    temperatures = torch.ones(4, device=device)
    expected = logits.argmax(dim=-1)
    for num_splits, block in [(None, None), (2, 16)]:  # one tile per split; seven
        tokens = sample_gumbel(logits, temperatures, greedy, 5, num_splits=num_splits,
                               block=block)
        assert tokens.dtype == torch.int64 and tokens.shape == (4,)
        assert torch.equal(tokens, expected), (num_splits, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_rows_draw_the_documented_noise(dtype, device):
    torch.manual_seed(1)
    logits = torch.randn(3, 150).to(dtype).to(device)  # V not a multiple of 4
    # Far from 1 both ways: the winner moves when T is misapplied.
    temperatures = torch.tensor([0.25, 4.0, 1.5], device=device)
    greedy = torch.zeros(3, dtype=torch.bool, device=device)
    for seed in (2**40 + 7, -3):  # the key's high word set; a negative seed
        tokens = sample_gumbel(logits, temperatures, greedy, seed, num_splits=2, block=64)
        assert_matches_oracle(tokens, logits, temperatures, greedy, seed)


def test_a_rows_token_ignores_splits_block_other_rows_and_row_stride(device):
    torch.manual_seed(2)
    logits = torch.randn(3, 160, device=device)
    temperatures = torch.tensor([1.0, 0.8, 1.3], device=device)
    greedy = torch.zeros(3, dtype=torch.bool, device=device)
    tokens = sample_gumbel(logits, temperatures, greedy, 9, num_splits=1, block=256)
    assert torch.equal(sample_gumbel(logits, temperatures, greedy, 9, num_splits=5, block=32),
                       tokens)
    # Other rows' logits, temperatures and greedy flags change; row 1 keeps its token.
    others = logits.clone()
    others[[0, 2]] = torch.randn(2, 160, device=device) * 5
    other_temperatures = torch.tensor([0.3, 0.8, 1.0], device=device)
    other_greedy = torch.tensor([False, False, True], device=device)
    assert sample_gumbel(others, other_temperatures, other_greedy, 9)[1] == tokens[1]
    # Rows sliced out of a wider buffer (stride(0) > V): the same tokens.
    wide = torch.randn(5, 197, device=device)
    wide[1:4, :160] = logits
    assert torch.equal(sample_gumbel(wide[1:4, :160], temperatures, greedy, 9), tokens)


def test_same_seed_same_tokens_other_seed_other_tokens(device):
    logits = torch.zeros(6, 64, device=device)  # uniform: each row has 64 equally likely tokens
    temperatures = torch.ones(6, device=device)
    greedy = torch.zeros(6, dtype=torch.bool, device=device)
    first = sample_gumbel(logits, temperatures, greedy, 11, num_splits=1)
    assert torch.equal(sample_gumbel(logits, temperatures, greedy, 11, num_splits=1), first)
    other = sample_gumbel(logits, temperatures, greedy, 12, num_splits=1)
    # Independent uniform draws agree with probability 1/64 per row.
    assert (other != first).sum() >= 5
    assert len(set(first.tolist())) >= 5  # rows get independent noise too


def test_minus_inf_and_nan_never_win_and_dead_rows_stay_in_range(device):
    torch.manual_seed(3)
    logits = torch.randn(5, 200, device=device)
    logits[0, ::2] = float("-inf")  # row 0: only odd tokens allowed
    logits[1, :] = float("-inf")  # row 1: nothing allowed (random)
    logits[2, :] = float("-inf")  # row 2: nothing allowed (greedy)
    logits[3, 10:190] = float("nan")  # row 3: NaN in the middle
    logits[4, :199] = float("-inf")  # row 4: one token left
    temperatures = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5], device=device)
    greedy = torch.tensor([False, False, True, False, False], device=device)
    for seed in range(2):
        for fn in (sample_gumbel, sample_gumbel_reference):
            tokens = fn(logits, temperatures, greedy, seed).tolist()
            assert tokens[0] % 2 == 1, fn
            assert tokens[1] == 0 and tokens[2] == 0, fn  # first column: in range
            assert tokens[3] < 10 or tokens[3] >= 190, fn
            assert tokens[4] == 199, fn


def test_tiny_temperature_is_argmax(device):
    torch.manual_seed(4)
    # Logits 0.01 apart: divided by T = 1e-5 the gaps are 1000, against Gumbel noise whose
    # spread over 300 draws is ~10.
    logits = torch.stack([torch.randperm(300) for _ in range(3)]).float().to(device) * 0.01
    temperatures = torch.full((3,), 1e-5, device=device)
    greedy = torch.zeros(3, dtype=torch.bool, device=device)
    expected = logits.argmax(dim=-1)
    assert torch.equal(sample_gumbel(logits, temperatures, greedy, 1), expected)
    assert torch.equal(sample_gumbel_reference(logits, temperatures, greedy, 1), expected)


def test_empty_batch(device):
    tokens = sample_gumbel(torch.zeros(0, 10, device=device), torch.ones(0, device=device),
                           torch.zeros(0, dtype=torch.bool, device=device), 0)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64


@triton.jit
def _exponential_probe(bits_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    bits = tl.load(bits_ptr + offsets).to(tl.uint32)
    tl.store(out_ptr + offsets, _exponential(bits))


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_exponential_transform_keeps_precision_near_zero_and_never_gives_nan(device):
    edges = [0, 1, 2, 100, 2**20, 2**26 - 1, 2**26, 2**26 + 1, 2**31, 2**32 - 129, 2**32 - 128,
             2**32 - 1]
    rng = np.random.default_rng(0)
    sweep = np.concatenate([np.array(edges), rng.integers(0, 2**32, 4096 - len(edges))])
    sweep.sort()
    bits = torch.from_numpy(sweep).to(device)  # int64
    out = torch.empty(4096, dtype=torch.float32, device=device)
    sampling.launchable(_exponential_probe, bits)[(1,)](bits, out, N=4096)
    exponential = out.cpu().double().numpy()
    assert not np.isnan(exponential).any()
    assert np.all(exponential > 0)  # never 0, so the noise -log2(E) is never +inf
    assert np.all(exponential[1:] >= exponential[:-1])  # more bits, larger E
    # Exactly the draws whose v = (bits + 0.5) / 2^32 rounds to 1.0 in float32 are infinite.
    v = (sweep.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32)
    assert np.array_equal(np.isinf(exponential), v == 1)
    finite = v < 1
    truth = -np.log1p(-v[finite].astype(np.float64)) / math.log(2)
    # Relative error: below 2^-6 the series (< 1e-7); above it, 1 - v's rounding (2^-25) and
    # log2's (GPU: ~2^-22 absolute) over E >= 2^-6 / ln 2: < 2e-5.
    np.testing.assert_allclose(exponential[finite], truth, rtol=2e-5, atol=0)
    np.testing.assert_allclose(exponential[finite & (v < 2**-6)], truth[v[finite] < 2**-6],
                               rtol=1e-6, atol=0)
    assert exponential[0] < 1e-9  # bits = 0: E ≈ 2^-33 / ln 2, not rounded to 0


# ----------------------------------------------------------------------------------------
# Distributions: the oracle (the kernel's exact noise) and the torch reference

LOGITS = [2.0, 1.5, 0.5, 0.0, -1.0, float("-inf")]
NUM_SAMPLES = 40_000
# Bretagnolle–Huber–Carol: P(||p_hat - p||_1 >= eps) <= 2^k exp(-N eps^2 / 2) over k = 6
# outcomes. N = 40,000 and a failure probability of 1e-6 give eps = 0.030: total variation
# < 0.015, while ignoring the temperature (T = 0.5 vs 1) moves it by 0.2 and swapping two
# tokens by > 0.05.
FAILURE_PROBABILITY = 1e-6
TV_BOUND = 0.5 * math.sqrt(
    2 * (len(LOGITS) * math.log(2) + math.log(1 / FAILURE_PROBABILITY)) / NUM_SAMPLES
)


def _total_variation(tokens: np.ndarray, temperature: float) -> float:
    counts = np.bincount(tokens, minlength=len(LOGITS)) / len(tokens)
    expected = torch.softmax(torch.tensor(LOGITS, dtype=torch.float64) / temperature, 0)
    assert counts[-1] == 0  # the -inf token is never drawn
    return 0.5 * float(np.abs(counts - expected.numpy()).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_oracle_noise_samples_softmax(temperature):
    # One row per draw (identical logits): the rows' noise comes from distinct counters.
    logits = torch.tensor(LOGITS).expand(NUM_SAMPLES, -1)
    temperatures = torch.full((NUM_SAMPLES,), temperature)
    greedy = torch.zeros(NUM_SAMPLES, dtype=torch.bool)
    tokens, _ = oracle_tokens(logits, temperatures, greedy, seed=int(temperature * 10))
    assert _total_variation(tokens, temperature) < TV_BOUND


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_reference_samples_softmax(temperature):
    logits = torch.tensor(LOGITS).expand(NUM_SAMPLES, -1)
    temperatures = torch.full((NUM_SAMPLES,), temperature)
    greedy = torch.zeros(NUM_SAMPLES, dtype=torch.bool)
    tokens = sample_gumbel_reference(logits, temperatures, greedy, 123).numpy()
    assert _total_variation(tokens, temperature) < TV_BOUND
    again = sample_gumbel_reference(logits, temperatures, greedy, 123).numpy()
    assert np.array_equal(tokens, again)


def test_the_bound_can_fail():
    """The cases above differ from their nearest wrong variants by well over TV_BOUND."""
    right = torch.softmax(torch.tensor(LOGITS) / 0.5, 0)
    wrong = torch.softmax(torch.tensor(LOGITS), 0)
    assert 0.5 * (right - wrong).abs().sum() > 5 * TV_BOUND


def test_reference_greedy_rows_are_argmax():
    torch.manual_seed(5)
    logits = torch.randint(-3, 4, (8, 50)).bfloat16()
    greedy = torch.tensor([True, False] * 4)
    tokens = sample_gumbel_reference(logits, torch.ones(8), greedy, 0)
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])


# ----------------------------------------------------------------------------------------
# Input checks


def _args(**overrides):
    args = dict(logits=torch.zeros(3, 16), temperatures=torch.ones(3),
                greedy_mask=torch.zeros(3, dtype=torch.bool), seed=0)
    return {**args, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"logits": torch.zeros(16)}, r"logits must be \(rows, vocab\)"),
        ({"logits": torch.zeros(3, 16, dtype=torch.int64)}, "logits has dtype torch.int64"),
        ({"logits": torch.zeros(16, 3).t()}, "logits must be contiguous in its last axis"),
        ({"logits": torch.zeros(3, 0)}, "vocabulary size"),
        ({"temperatures": torch.ones(4)}, r"temperatures must have shape \(3,\)"),
        ({"temperatures": torch.ones(3, dtype=torch.float64)},
         "temperatures must be torch.float32"),
        ({"temperatures": torch.ones(6)[::2]}, "temperatures must be contiguous"),
        ({"greedy_mask": torch.zeros(3, dtype=torch.uint8)}, "greedy_mask must be torch.bool"),
        ({"greedy_mask": torch.zeros(3, dtype=torch.bool, device="meta")},
         "greedy_mask is on meta"),
        ({"seed": 1.5}, "seed must be a Python int"),
        ({"seed": True}, "seed must be a Python int"),
    ],
)
@pytest.mark.parametrize("fn", [sample_gumbel, sample_gumbel_reference])
def test_bad_inputs_are_named(fn, overrides, message):
    with pytest.raises(ValueError, match=message):
        fn(**_args(**overrides))


def test_bad_block_is_named():
    with pytest.raises(ValueError, match="block must be a power of 2"):
        sample_gumbel(**_args(), block=12)


# ----------------------------------------------------------------------------------------
# The sampler's fast path


def _metadata(*params: SamplingParams, vocab_size: int = 50, eos: int | None = None,
              seeded: bool = False, device: str = "cpu") -> SamplingMetadata:
    rows = [
        SamplingRow(p, [1, 2], [], eos,
                    sampler_module.make_generator(p.seed, device) if p.seed is not None else None)
        for p in params
    ]
    return SamplingMetadata.build(rows, vocab_size, device)


PLAIN = SamplingParams()
GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize(
    ("params", "eligible"),
    [
        ((PLAIN, PLAIN), True),
        ((SamplingParams(temperature=0.6), GREEDY), True),  # mixed greedy and random
        ((GREEDY, SamplingParams(top_k=1)), False),  # all greedy: the torch argmax already
        ((PLAIN, SamplingParams(top_k=5)), False),
        ((PLAIN, SamplingParams(top_p=0.9)), False),
        ((PLAIN, SamplingParams(min_p=0.1)), False),
        ((PLAIN, SamplingParams(repetition_penalty=1.2)), False),
        ((PLAIN, SamplingParams(presence_penalty=0.5)), False),
        ((PLAIN, SamplingParams(frequency_penalty=0.5)), False),
        ((PLAIN, SamplingParams(logprobs=0)), False),
        ((PLAIN, SamplingParams(min_tokens=3)), False),  # EOS banned (eos=0 below)
        ((PLAIN, SamplingParams(min_tokens=3, ignore_eos=True)), True),  # nothing banned
        ((PLAIN, SamplingParams(seed=7)), False),  # a seeded random row keeps its generator
        ((PLAIN, SamplingParams(temperature=0.0, seed=7)), True),  # seeded greedy: no noise
        ((PLAIN, SamplingParams(temperature=0.0, top_p=0.5)), True),  # greedy ignores filters
    ],
)
def test_fast_path_only_for_temperature_only_batches(params, eligible):
    metadata = _metadata(*params, eos=0)
    assert sampler_module._temperature_only(metadata) is eligible
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.float32, dim=lambda: 2,
                                stride=lambda axis: 1)
    assert sampler_module._fast_path_eligible(cuda_like, metadata) is eligible


def test_fast_path_needs_cuda_and_the_fast_kernels(monkeypatch):
    metadata = _metadata(PLAIN)
    assert not sampler_module._fast_path_eligible(torch.zeros(1, 50), metadata)  # CPU
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.float32, dim=lambda: 2,
                                stride=lambda axis: 1)
    assert sampler_module._fast_path_eligible(cuda_like, metadata)
    assert not sampler_module._fast_path_eligible(
        SimpleNamespace(**{**vars(cuda_like), "dtype": torch.float64}), metadata)
    assert not sampler_module._fast_path_eligible(
        SimpleNamespace(**{**vars(cuda_like), "stride": lambda axis: 2}), metadata)
    monkeypatch.setenv("KILN_REFERENCE_KERNELS", "1")
    assert not sampler_module._fast_path_eligible(cuda_like, metadata)


@pytest.fixture
def fast_kernels_here(monkeypatch, device):
    """Lets the fast path run on this test's device: the interpreter on the CPU."""
    monkeypatch.setattr(sampler_module, "_fast_kernels", lambda logits: True)
    calls = []
    real = sampling.sample_gumbel

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_gumbel", spy)
    return calls


def test_sampler_fast_path_reads_the_logits_as_they_are(fast_kernels_here, device):
    torch.manual_seed(6)
    logits = torch.randn(4, 50, dtype=torch.bfloat16, device=device)
    original = logits.clone()
    metadata = _metadata(PLAIN, GREEDY, SamplingParams(temperature=0.7), GREEDY, device=device)
    torch.manual_seed(100)
    out = Sampler()(logits, metadata)
    (args,) = fast_kernels_here
    assert args[0] is logits  # no float32 copy
    assert args[1] is metadata.temperatures and args[2] is metadata.greedy_mask
    torch.manual_seed(100)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    assert args[3] == seed  # from the CPU generator: reproducible under torch.manual_seed
    assert out.logprobs is None
    assert torch.equal(out.sampled_token_ids,
                       sampling.sample_gumbel(logits, metadata.temperatures,
                                              metadata.greedy_mask, seed))
    assert torch.equal(out.sampled_token_ids[1::2], logits.argmax(-1)[1::2])
    assert torch.equal(logits, original)


def test_sampler_keeps_the_torch_path_for_other_batches(fast_kernels_here, device):
    logits = torch.randn(2, 50, device=device)
    for params in [(PLAIN, SamplingParams(top_k=3)), (GREEDY, GREEDY),
                   (PLAIN, SamplingParams(seed=3))]:
        Sampler()(logits, _metadata(*params, device=device))
    assert fast_kernels_here == []

"""Sampler: exact distributions, greedy, penalties, min_tokens, seeds, logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.messages import TokenLogprobs
from kiln.runtime.sampler import (
    MIN_TEMPERATURE,
    RequestGenerators,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    _packed_copy,
    to_token_logprobs,
)
from kiln.runtime.sampling_params import SamplingParams

SAMPLER = Sampler()


def sample(
    logits: torch.Tensor,
    rows: list[SamplingRow],
):
    metadata = SamplingMetadata.build(rows, logits.shape[1], logits.device)
    return SAMPLER(logits, metadata), metadata


def row(params: SamplingParams, prompt=(), output=(), eos=None, generator=None) -> SamplingRow:
    return SamplingRow(params, list(prompt), list(output), eos, generator)


# ----------------------------------------------------------------------------------------
# Distributions


def reference_probs(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """The exact target distribution in float64: temperature, top-k, top-p, min-p, written
    independently of the sampler (sort descending, keep prefixes)."""
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=0)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[: top_k if top_k > 0 else len(logits)]] = True
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    # Smallest top set whose mass reaches top_p.
    cumulative = probs[order].cumsum(0)
    # Cases sit clear of the filter boundaries, so float32 rounding cannot flip a token.
    assert top_p == 1.0 or (cumulative - top_p).abs().min() > 0.01
    num_kept = int((cumulative < top_p).sum()) + 1
    keep = torch.zeros_like(keep)
    keep[order[:num_kept]] = True
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    assert min_p == 0.0 or (probs - min_p * probs.max()).abs().min() > 0.01
    probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


LOGITS = [2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.5]
NUM_SAMPLES = 40_000
# Bretagnolle–Huber–Carol: P(||p_hat - p||_1 >= eps) <= 2^k exp(-N eps^2 / 2) over k
# outcomes. With k = 8, N = 40,000 and a failure probability of 1e-6 that gives
# eps = 0.031, i.e. total variation < 0.016. Every case below differs from its nearest
# wrong variant (filter off, filters in another order, temperature ignored) by well over
# that, and filtered tokens must have exactly zero count.
FAILURE_PROBABILITY = 1e-6
TV_BOUND = 0.5 * math.sqrt(
    2 * (len(LOGITS) * math.log(2) + math.log(1 / FAILURE_PROBABILITY)) / NUM_SAMPLES
)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [
        (1.0, -1, 1.0, 0.0),
        (0.5, -1, 1.0, 0.0),
        (2.0, -1, 1.0, 0.0),
        (1.0, 3, 1.0, 0.0),
        (1.0, -1, 0.3, 0.0),
        (1.0, -1, 0.7, 0.0),
        (1.0, -1, 1.0, 0.3),
        (0.8, 5, 0.9, 0.25),  # each filter cuts a token here
    ],
)
def test_empirical_distribution_matches_reference(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    torch.manual_seed(0)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = torch.tensor(LOGITS).expand(NUM_SAMPLES, -1)  # (N, V): one row per draw
    out, _ = sample(logits, [row(params)] * NUM_SAMPLES)
    counts = torch.bincount(out.sampled_token_ids, minlength=len(LOGITS)).double()
    expected = reference_probs(LOGITS, temperature, top_k, top_p, min_p)
    assert torch.equal(counts[expected == 0], torch.zeros_like(counts[expected == 0]))
    total_variation = 0.5 * (counts / NUM_SAMPLES - expected).abs().sum().item()
    assert total_variation < TV_BOUND, (total_variation, TV_BOUND, expected)


def test_reference_cases_are_distinct() -> None:
    """The filters in the cases above actually cut something, so the test can fail."""
    full = reference_probs(LOGITS, 1.0, -1, 1.0, 0.0)
    for case in [(1.0, 3, 1.0, 0.0), (1.0, -1, 0.7, 0.0), (1.0, -1, 1.0, 0.3)]:
        assert 0.5 * (reference_probs(LOGITS, *case) - full).abs().sum() > 5 * TV_BOUND


# ----------------------------------------------------------------------------------------
# Greedy, penalties, min_tokens


def test_greedy_is_argmax_also_in_a_mixed_batch() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 100)  # (R, V)
    original = logits.clone()
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(16)]
    params[0] = SamplingParams(top_k=1, temperature=0.7)  # top_k=1 is greedy too
    out, metadata = sample(logits, [row(p) for p in params])
    greedy = metadata.greedy_mask
    assert greedy.tolist() == [p.is_greedy for p in params]
    assert torch.equal(out.sampled_token_ids[greedy], logits.argmax(-1)[greedy])
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(logits, original)  # the caller's logits are not modified


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.1]])  # (1, V=5)
    params = SamplingParams(
        temperature=0.0,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logprobs=5,
    )
    # Prompt holds 0 and 1; output holds 2 twice and 1 once; 3 and 4 are unseen.
    #   repetition (prompt + output: 0, 1, 2): 2/2 = 1.0, -1*2 = -2.0, 0.5/2 = 0.25
    #   frequency (output only): 1: -2.0 - 0.25*1 = -2.25, 2: 0.25 - 0.25*2 = -0.25
    #   presence (output only):  1: -2.25 - 0.5 = -2.75,   2: -0.25 - 0.5 = -0.75
    # Token 0 is only in the prompt: presence and frequency leave it alone.
    expected = torch.tensor([1.0, -2.75, -0.75, -0.5, 1.1], dtype=torch.float64)
    out, _ = sample(logits, [row(params, prompt=[0, 1], output=[2, 2, 1])])
    assert out.sampled_token_ids.tolist() == [4]
    # Greedy logprobs are log_softmax of the penalised logits, so they reveal them.
    got = torch.empty(5, dtype=torch.float64)
    got[out.logprobs.top_token_ids[0]] = out.logprobs.top_logprobs[0].double()
    torch.testing.assert_close(got, torch.log_softmax(expected, 0), atol=1e-6, rtol=0)


def test_penalties_only_touch_their_own_rows() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.1]] * 2)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=100.0, logprobs=0)
    plain = SamplingParams(temperature=0.0, logprobs=0)
    out, _ = sample(logits, [row(penalised, output=[0, 4]), row(plain, output=[0, 4])])
    assert out.sampled_token_ids.tolist() == [2, 0]


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    eos, stop_id = 3, 1
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0]] * 4)  # (R, V): EOS then stop id win
    greedy = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop_id])
    rows = [
        row(greedy, output=[], eos=eos),
        row(greedy, output=[4], eos=eos),
        row(greedy, output=[4, 4], eos=eos),  # min_tokens reached: EOS allowed again
        row(SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), eos=eos),
    ]
    out, _ = sample(logits, rows)
    assert out.sampled_token_ids.tolist() == [4, 4, eos, eos]


def test_pending_output_tokens_count_toward_min_tokens() -> None:
    """Tokens sampled by steps still in flight are generated tokens: once they and the
    known output reach min_tokens, EOS is allowed again."""
    eos = 3
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0]] * 3)  # (R, V): EOS wins when allowed
    params = SamplingParams(temperature=0.0, min_tokens=3)
    rows = [
        SamplingRow(params, [], [1], eos, num_pending_output_tokens=1),  # 2 < 3: banned
        SamplingRow(params, [], [1], eos, num_pending_output_tokens=2),  # 3: allowed
        SamplingRow(params, [], [], eos, num_pending_output_tokens=3),  # all still pending
    ]
    out, metadata = sample(logits, rows)
    assert out.sampled_token_ids.tolist() == [1, eos, eos]
    assert metadata.banned_flat_indices.tolist() == [eos]  # row 0 only


def test_min_tokens_blocks_eos_for_random_rows() -> None:
    torch.manual_seed(2)
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0]]).expand(2000, -1)  # EOS has p ~ 0.87
    params = SamplingParams(min_tokens=1)
    out, _ = sample(logits, [row(params, eos=3)] * 2000)
    assert (out.sampled_token_ids != 3).all()


# ----------------------------------------------------------------------------------------
# Seeds


def run_steps(batch_layout: list[str | None], num_steps: int, vocab: int) -> dict[str, list]:
    """Generate num_steps tokens for a batch; entries are seeded request ids or None
    (an unseeded filler). Logits depend only on (request, step), so a request's tokens can
    depend on the batch only through the sampler."""
    generators = RequestGenerators("cpu")
    seeds = {"a": 11, "b": 12, "c": 11}  # c shares a's seed: same tokens as a
    params = {
        rid: SamplingParams(seed=seed, temperature=0.9, top_p=0.95, frequency_penalty=0.3)
        for rid, seed in seeds.items()
    }
    filler = SamplingParams(temperature=1.3, top_k=20)
    outputs: dict[str, list[int]] = {rid: [] for rid in batch_layout if rid is not None}
    torch.manual_seed(len(batch_layout))  # fillers draw from the default generator
    for step in range(num_steps):
        rows, logits = [], []
        for position, rid in enumerate(batch_layout):
            key = seeds[rid] if rid is not None else 1000 + position
            logits.append(torch.randn(vocab, generator=torch.Generator().manual_seed(key + step)))
            if rid is None:
                rows.append(row(filler))
            else:
                gen = generators.get(rid, params[rid])
                rows.append(row(params[rid], prompt=[1, 2], output=outputs[rid], generator=gen))
        out, _ = sample(torch.stack(logits), rows)  # (R, V)
        for rid, token in zip(batch_layout, out.sampled_token_ids.tolist()):
            if rid is not None:
                outputs[rid].append(token)
    return outputs


def test_seeded_requests_ignore_batch_composition_and_position() -> None:
    vocab, steps = 64, 20
    alone = run_steps(["a"], steps, vocab)["a"]
    assert len(set(alone)) > 5  # really random, so equality below means something
    layouts = [
        [None, "a", None, "b"],
        ["b", None, None, None, None, None, "a"],
        ["a", "c", "b"],
        [None] * 9 + ["a"],
    ]
    for layout in layouts:
        outputs = run_steps(layout, steps, vocab)
        assert outputs["a"] == alone, layout
        if "c" in outputs:
            assert outputs["c"] == alone  # same seed, same logits: same tokens
    b_runs = [run_steps(layout, steps, vocab)["b"] for layout in layouts[:3]]
    assert b_runs[0] == b_runs[1] == b_runs[2] != alone


def test_request_generators_lifecycle() -> None:
    generators = RequestGenerators("cpu")
    assert generators.get("x", SamplingParams()) is None  # unseeded: shared generator
    first = generators.get("y", SamplingParams(seed=-5))
    assert generators.get("y", SamplingParams(seed=-5)) is first  # kept across steps
    assert len(generators) == 1
    generators.drop("y")
    generators.drop("never-added")
    assert len(generators) == 0


# ----------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_are_log_softmax_of_processed_logits() -> None:
    torch.manual_seed(3)
    vocab = 50
    logits = torch.randn(4, vocab) * 3  # (R, V)
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=5),  # random row: after T
        SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=3),  # greedy row
        SamplingParams(temperature=1.0),  # no logprobs
        SamplingParams(temperature=1.2, top_p=0.5, logprobs=0),  # only the sampled one
    ]
    rows = [row(p, prompt=[0, 1, 2]) for p in params]
    out, metadata = sample(logits, rows)

    processed = logits.double().clone()
    processed[0] /= 0.7
    seen = processed[1, :3]
    processed[1, :3] = torch.where(seen > 0, seen / 1.5, seen * 1.5)
    processed[3] /= 1.2
    want = torch.log_softmax(processed, dim=-1)  # (R, V)

    sampled = out.sampled_token_ids
    lp = out.logprobs
    torch.testing.assert_close(
        lp.sampled_logprobs.double(), want.gather(1, sampled.unsqueeze(1)).squeeze(1),
        atol=1e-5, rtol=0,
    )
    assert lp.top_token_ids.shape == (4, 5)
    for r in (0, 1, 3):
        values = lp.top_logprobs[r]
        assert (values[:-1] >= values[1:]).all()  # best first
        assert torch.equal(lp.top_token_ids[r], want[r].topk(5).indices)
        torch.testing.assert_close(values.double(), want[r].topk(5).values, atol=1e-5, rtol=0)

    records = to_token_logprobs(sampled.tolist(), lp, metadata.num_logprobs)
    assert records[2] is None
    assert isinstance(records[0], TokenLogprobs)
    assert [len(r.top) for r in (records[0], records[1], records[3])] == [5, 3, 0]
    assert records[1].sampled_token_id == sampled[1].item()
    assert records[1].top[0][0] == sampled[1].item()  # greedy: its own token ranks first
    assert records[1].top[0][1] == pytest.approx(records[1].sampled_logprob)


def test_no_logprobs_when_none_requested() -> None:
    out, metadata = sample(torch.randn(2, 10), [row(SamplingParams())] * 2)
    assert out.logprobs is None
    assert to_token_logprobs(out.sampled_token_ids.tolist(), None, metadata.num_logprobs) == [
        None,
        None,
    ]


def test_min_tokens_banned_token_has_minus_inf_logprob() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=1, logprobs=3)
    out, _ = sample(torch.tensor([[0.0, 1.0, 5.0]]), [row(params, eos=2)])
    assert out.sampled_token_ids.tolist() == [1]
    assert out.logprobs.top_token_ids[0].tolist()[:2] == [1, 0]
    assert out.logprobs.top_logprobs[0, 2].item() == -math.inf


# ----------------------------------------------------------------------------------------
# SamplingMetadata.build against a per-row reference


def reference_metadata(rows: list[SamplingRow], vocab_size: int) -> dict:
    """Every field computed row by row straight from SamplingParams: the spec that build()
    vectorises."""
    params = [r.params for r in rows]
    greedy = [p.is_greedy for p in params]
    random_params = [p for p, is_greedy in zip(params, greedy) if not is_greedy]

    def has_penalty(p: SamplingParams) -> bool:
        return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0

    any_penalty = any(has_penalty(p) for p in params)

    def floats(values: list[float], needed: bool = True) -> torch.Tensor | None:
        return torch.tensor(values, dtype=torch.float32) if needed else None

    def padded_ids(lists: list[list[int]]) -> torch.Tensor | None:
        if not any_penalty:
            return None
        kept = [list(ids) if has_penalty(p) else [] for ids, p in zip(lists, params)]
        width = max((len(ids) for ids in kept), default=0)
        padded = [ids + [vocab_size] * (width - len(ids)) for ids in kept]
        return torch.tensor(padded, dtype=torch.int64).reshape(len(rows), width)

    banned = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) + r.num_pending_output_tokens >= r.params.min_tokens:
            continue
        stop_ids = set(r.params.stop_token_ids)
        if r.eos_token_id is not None and not r.params.ignore_eos:
            stop_ids.add(r.eos_token_id)
        banned += [i * vocab_size + t for t in sorted(stop_ids) if t < vocab_size]
    requested = [p.logprobs for p in params if p.logprobs is not None]
    return {
        "temperatures": floats(
            [1.0 if g else max(p.temperature, MIN_TEMPERATURE) for p, g in zip(params, greedy)]
        ),
        "greedy_mask": torch.tensor(greedy, dtype=torch.bool),
        "all_greedy": all(greedy),
        "any_greedy": any(greedy),
        "top_k": (
            torch.tensor(
                [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params],
                dtype=torch.int64,
            )
            if any(p.top_k != -1 for p in random_params)
            else None
        ),
        "top_p": floats([p.top_p for p in params], any(p.top_p < 1 for p in random_params)),
        "min_p": floats([p.min_p for p in params], any(p.min_p > 0 for p in random_params)),
        "repetition_penalties": floats([p.repetition_penalty for p in params], any_penalty),
        "presence_penalties": floats([p.presence_penalty for p in params], any_penalty),
        "frequency_penalties": floats([p.frequency_penalty for p in params], any_penalty),
        "prompt_token_ids": padded_ids([r.prompt_token_ids for r in rows]),
        "output_token_ids": padded_ids([r.output_token_ids for r in rows]),
        "banned_flat_indices": torch.tensor(banned, dtype=torch.int64) if banned else None,
        "generators": {
            i: r.generator
            for i, (r, g) in enumerate(zip(rows, greedy))
            if r.generator is not None and not g
        },
        "num_logprobs": [p.logprobs for p in params],
        "max_num_logprobs": max(requested) if requested else None,
    }


REFERENCE_VOCAB = 32


def maybe(default, *others):
    """Mostly the default (most batches use no optional feature), sometimes another."""
    return st.one_of(st.just(default), st.just(default), st.sampled_from(others))


sampling_params = st.builds(
    SamplingParams,
    temperature=maybe(1.0, 0.0, 1e-7, 0.7),
    top_k=maybe(-1, 0, 1, 5, 10**30),  # 10**30: past int64, clamped to V
    top_p=maybe(1.0, 0.5),
    min_p=maybe(0.0, 0.2),
    repetition_penalty=maybe(1.0, 1.3),
    presence_penalty=maybe(0.0, -0.5),
    frequency_penalty=maybe(0.0, 0.25),
    seed=maybe(None, 3),
    max_tokens=st.just(16),
    min_tokens=maybe(0, 2, 5),
    stop_token_ids=maybe([], [4], [REFERENCE_VOCAB + 1, 2]),  # ids >= V are never banned
    ignore_eos=st.booleans(),
    logprobs=maybe(None, 0, 3),
)


@st.composite
def sampling_batches(draw) -> list[SamplingRow]:
    # Rows pick from a small pool of params, so uniform batches (the common case) are common.
    pool = draw(st.lists(sampling_params, min_size=1, max_size=3))
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        params = draw(st.sampled_from(pool))
        token_ids = st.lists(st.integers(0, REFERENCE_VOCAB - 1), max_size=6)
        rows.append(
            SamplingRow(
                params,
                draw(token_ids),
                draw(token_ids),
                draw(st.sampled_from([None, 2, REFERENCE_VOCAB + 5])),
                torch.Generator() if params.seed is not None else None,
                draw(st.integers(0, 3)),
            )
        )
    return rows


@settings(max_examples=300, deadline=None)
@given(sampling_batches())
def test_build_matches_per_row_reference(rows) -> None:
    metadata = SamplingMetadata.build(rows, REFERENCE_VOCAB, "cpu")
    for name, want in reference_metadata(rows, REFERENCE_VOCAB).items():
        got = getattr(metadata, name)
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), name
            assert (got.dtype, got.shape) == (want.dtype, want.shape), name
            assert torch.equal(got, want), name
        else:
            assert got == want, name


def test_packed_copy_round_trips_every_array() -> None:
    """The CUDA path of build: all host arrays in one buffer and one copy, each tensor a
    typed view at an aligned offset (run here with the CPU as the 'device')."""
    host = {
        "mask": np.array([True, False, True]),  # 3 bytes: the next array must realign
        "floats": np.array([0.5, -2.0, 3.25], dtype=np.float32),
        "empty": np.zeros(0, dtype=np.int64),
        "ids": np.arange(12, dtype=np.int64).reshape(3, 4) - 5,
        "no_columns": np.zeros((3, 0), dtype=np.int64),
    }
    tensors = _packed_copy(host, torch.device("cpu"), pin_memory=False)
    for name, array in host.items():
        assert torch.equal(tensors[name], torch.from_numpy(array)), name


def test_all_greedy_batch_reads_the_logits_without_changing_them() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 20)  # (R, V)
    original = logits.clone()
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(top_k=1)]
    out, _ = sample(logits, [row(params[0]), row(params[1]), row(params[0])])
    assert torch.equal(logits, original)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    # Greedy logprobs are the log_softmax of the logits as they came (no temperature).
    assert torch.equal(out.logprobs.top_logprobs, torch.log_softmax(logits, -1).topk(2).values)


def test_all_greedy_batch_takes_the_argmax_in_the_logits_dtype() -> None:
    """The graphs hand over bf16 logits: an all-greedy batch without logprobs takes their
    argmax as they are (widening to float32 is exact, so the token cannot differ), ties to
    the lowest index as on float32."""
    torch.manual_seed(5)
    logits = torch.randn(4, 50).to(torch.bfloat16)
    logits[2, 7] = logits[2, 30] = logits[2].max() + 1  # a tie: the lower index wins
    out, _ = sample(logits, [row(SamplingParams(temperature=0.0))] * 4)
    assert out.logprobs is None
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.sampled_token_ids[2] == 7

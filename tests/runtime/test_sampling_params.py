"""SamplingParams: defaults, normalisation, and one ValueError per bad field naming it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from kiln.runtime.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert (p.stop, p.stop_token_ids) == ([], [])
    assert (p.ignore_eos, p.skip_special_tokens, p.include_stop_str_in_output) == (
        False,
        True,
        False,
    )
    assert not p.is_greedy


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=0).top_k == -1  # 0 means disabled, as in vLLM
    assert SamplingParams(temperature=1).temperature == 1.0
    assert SamplingParams(max_tokens=None).max_tokens is None  # up to the model length
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=1).is_greedy


def test_frozen_and_replace_revalidates() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.n = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)


BAD_VALUES = [
    ("n", 0),
    ("n", -1),
    ("n", 1.0),
    ("n", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1"),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", False),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -3),
    ("seed", 1.5),
    ("seed", True),
    ("seed", 2**64),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 16.0),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("logprobs", -1),
    ("logprobs", 1.0),
    ("stop", [""]),
    ("stop", [1]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["1"]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 3),
    ("ignore_eos", 1),
    ("skip_special_tokens", "yes"),
    ("include_stop_str_in_output", None),
    ("output_kind", "delta"),
    ("output_kind", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=lambda v: repr(v))
def test_bad_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def _stop_strings(count: int) -> list[str]:
    return [f"s{i}" for i in range(count)]


CAPS = [
    # (field, make value of a given size, cap)
    ("n", lambda k: k, MAX_N),
    ("logprobs", lambda k: k, MAX_LOGPROBS),
    ("stop", _stop_strings, MAX_STOP_STRINGS),
    ("stop", lambda k: ["x" * k], MAX_STOP_STRING_CHARS),
    ("stop_token_ids", lambda k: [7] * k, MAX_STOP_TOKEN_IDS),
]


@pytest.mark.parametrize(("field", "make", "cap"), CAPS, ids=lambda v: repr(v)[:20])
def test_caps(field: str, make, cap: int) -> None:
    SamplingParams(**{field: make(cap)})  # at the cap: accepted
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: make(cap + 1)})


@pytest.mark.parametrize("field", ["n", "logprobs"])
def test_huge_counts_rejected(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: 10**9})


def test_huge_lists_rejected_before_their_elements_are_checked() -> None:
    # 10**9 elements cannot be built in a test; 10**6 bad elements show the length cap is
    # checked first (an element check would name the first bad one instead).
    with pytest.raises(ValueError, match="at most 1024 ids, got 1000000"):
        SamplingParams(stop_token_ids=[-1] * 10**6)
    with pytest.raises(ValueError, match="at most 16 strings, got 1000000"):
        SamplingParams(stop=[""] * 10**6)
    with pytest.raises(ValueError, match="got one of 1000000"):
        SamplingParams(stop=["x" * 10**6])
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10**9)


def test_message_states_the_range() -> None:
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=rf"n must be in \[1, {MAX_N}\], got 1000000000"):
        SamplingParams(n=10**9)


def test_uses_penalties():
    assert not SamplingParams().uses_penalties
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=-0.5).uses_penalties
    assert SamplingParams(frequency_penalty=0.2).uses_penalties

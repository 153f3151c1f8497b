"""The chunked-prefill cap: while a request decodes, the chunks of prompts longer than
max_prefill_tokens_while_decoding take at most that many tokens per step together (a long
prompt delays decoding streams by about one step's worth of work); shorter prompts go in
whole; with nothing decoding a prompt takes the whole budget."""

from __future__ import annotations

import pytest

from kiln.runtime.scheduler import SchedulerConfig
from tests.runtime.scheduler_helpers import make_request, make_scheduler, step
from tests.runtime.test_scheduler import check_invariants, expected_output, run_to_completion


def scheduled(out) -> list[tuple[str, int]]:
    return [(r.request_id, r.num_scheduled_tokens) for r in out.scheduled]


def test_a_long_prompt_is_cut_into_capped_chunks_while_others_decode():
    scheduler = make_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8)
    a = make_request("a", [1] * 5, max_tokens=12)
    scheduler.add_request(a)
    out, _ = step(scheduler)
    assert scheduled(out) == [("a", 5)]  # nothing decodes yet: the whole prompt at once
    b = make_request("b", [3] * 30, max_tokens=2)
    c = make_request("c", [4] * 3, max_tokens=2)
    scheduler.add_request(b)
    scheduler.add_request(c)
    out, _ = step(scheduler)
    # b (30 > cap) is cut to the cap; c (3 ≤ cap) is short and goes in whole
    assert scheduled(out) == [("a", 1), ("b", 8), ("c", 3)]
    out, _ = step(scheduler)
    assert scheduled(out) == [("a", 1), ("b", 8), ("c", 1)]  # b's chunks stay capped
    out, _ = step(scheduler)
    assert scheduled(out) == [("a", 1), ("b", 8)]
    out, _ = step(scheduler)
    assert scheduled(out) == [("a", 1), ("b", 6)]  # b's last 6: no longer over the cap
    check_invariants(scheduler)
    run_to_completion(scheduler)
    for request in (a, b, c):
        assert request.output_token_ids == expected_output(request)


def test_without_decoding_requests_a_prompt_takes_the_whole_budget():
    scheduler = make_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8)
    scheduler.add_request(make_request("a", [1] * 40, max_tokens=2))
    scheduler.add_request(make_request("b", [2] * 40, max_tokens=2))
    out, _ = step(scheduler)
    assert scheduled(out) == [("a", 40), ("b", 24)]


def test_no_cap_keeps_the_step_budget_alone():
    scheduler = make_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=None)
    scheduler.add_request(make_request("a", [1] * 5, max_tokens=8))
    step(scheduler)
    scheduler.add_request(make_request("b", [3] * 40, max_tokens=2))
    out, _ = step(scheduler)
    assert scheduled(out) == [("a", 1), ("b", 40)]


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_cap_is_rejected_naming_the_field(value):
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding"):
        SchedulerConfig(num_kv_blocks=8, max_prefill_tokens_while_decoding=value)


def test_long_prompts_share_the_cap_and_short_ones_fill_the_budget():
    scheduler = make_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8)
    scheduler.add_request(make_request("a", [1] * 5, max_tokens=12))
    step(scheduler)
    for name, length in (("b", 20), ("c", 20), ("d", 6), ("e", 6), ("f", 6)):
        scheduler.add_request(make_request(name, [2] * length, max_tokens=2))
    out, _ = step(scheduler)
    # b takes the whole cap, c none of it this step (it still waits: FCFS keeps d-f behind c)
    assert scheduled(out) == [("a", 1), ("b", 8)]
    check_invariants(scheduler)

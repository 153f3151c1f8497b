"""The scheduler's capacity policies: "max-utilization" admits while blocks are free and
preempts when they run out; "guaranteed-no-evict" admits only while every running request
can reach its longest length at once, so it never preempts."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.config import CAPACITY_POLICIES, EngineConfig, validated
from kiln.errors import KilnError
from kiln.runtime.request import RequestStatus
from kiln.runtime.scheduler import SchedulerConfig
from tests.runtime.scheduler_helpers import make_request, make_scheduler, step, token_for

NO_EVICT = "guaranteed-no-evict"


def run(scheduler, max_steps: int = 2000) -> tuple[int, list[int]]:
    """Steps until done: (preemptions, running count after each step)."""
    preemptions, running = 0, []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return preemptions, running
        out, _ = step(scheduler)
        preemptions += len(out.preempted_request_ids)
        running.append(scheduler.num_running)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def lockstep_requests(count: int) -> list:
    # 8-token prompts growing by 12: 19 tokens = 5 blocks of 4 at their longest.
    return [make_request(str(i), [1 + i] * 8, max_tokens=12, ignore_eos=True)
            for i in range(count)]


@pytest.mark.parametrize("policy", CAPACITY_POLICIES)
def test_requests_growing_past_the_cache_together(policy):
    # 12 usable blocks: three 2-block prompts fit at once, their 5-block ends do not (two do).
    scheduler = make_scheduler(num_kv_blocks=13, capacity_policy=policy,
                               enable_prefix_caching=False)
    requests = lockstep_requests(3)
    for request in requests:
        scheduler.add_request(request)
    preemptions, running = run(scheduler)
    if policy == NO_EVICT:  # two at a time (10 of 12 blocks reserved), the third after
        assert preemptions == 0 and max(running) == 2
        assert requests[2].metrics.first_scheduled_time >= requests[0].metrics.first_token_time
    else:  # all three start; the newest is preempted when the blocks run out
        assert preemptions >= 1 and max(running) == 3
        assert requests[2].metrics.num_preemptions >= 1
    for request in requests:  # the same tokens either way
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == [token_for(request.request_id, 8 + i)
                                            for i in range(12)]
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_no_evict_reserves_max_model_len_when_max_tokens_is_unset():
    # max_model_len 32: 8 blocks of 4 (31 tokens' KV: the last token's is never computed).
    # 12 usable blocks hold that reservation and a 2-block one, not a 3-block one besides.
    scheduler = make_scheduler(num_kv_blocks=13, max_model_len=32, capacity_policy=NO_EVICT)
    unbounded = make_request("unbounded", [1] * 8, max_tokens=None, ignore_eos=True)
    small = make_request("small", [2] * 4, max_tokens=4)
    third = make_request("third", [3] * 4, max_tokens=8)
    for request in (unbounded, small, third):
        scheduler.add_request(request)
    out, _ = step(scheduler)
    assert [c.request_id for c in out.scheduled] == ["unbounded", "small"]
    assert third.status is RequestStatus.WAITING
    preemptions, _ = run(scheduler)
    assert preemptions == 0 and unbounded.num_tokens == 32


def test_no_evict_admits_in_order_and_never_skips_the_head():
    # The head's reservation does not fit beside the running one; a later small request
    # that would fit still waits behind it (FCFS, as the block watermark does).
    scheduler = make_scheduler(num_kv_blocks=13, capacity_policy=NO_EVICT)
    first = make_request("first", [1] * 8, max_tokens=20)  # 7 blocks
    big = make_request("big", [2] * 8, max_tokens=20)  # 7 more: 14 > 12
    small = make_request("small", [3] * 2, max_tokens=2)  # 1 block
    for request in (first, big, small):
        scheduler.add_request(request)
    out, _ = step(scheduler)
    assert [c.request_id for c in out.scheduled] == ["first"]
    assert scheduler.num_waiting == 2
    preemptions, _ = run(scheduler)
    assert preemptions == 0 and big.is_finished and small.is_finished
    assert small.metrics.first_scheduled_time >= big.metrics.first_scheduled_time


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12), st.booleans()),
                      min_size=1, max_size=12),
    num_kv_blocks=st.integers(9, 24),
    budget=st.integers(2, 32),
    prefix_caching=st.booleans(),
)
def test_no_evict_never_preempts(requests, num_kv_blocks, budget, prefix_caching):
    """Any mix of prompts and max_tokens, any cache that fits the largest: nothing is ever
    preempted, everything finishes with its own tokens, and every block comes back."""
    scheduler = make_scheduler(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=budget,
                               max_model_len=32, capacity_policy=NO_EVICT,
                               enable_prefix_caching=prefix_caching)
    added = []
    for index, (prompt_len, max_tokens, shared_prefix) in enumerate(requests):
        prompt = ([9] * 4 if shared_prefix else []) + [index + 10] * prompt_len
        request = make_request(str(index), prompt, max_tokens=max_tokens, ignore_eos=True)
        try:
            scheduler.add_request(request)
        except ValueError:  # larger than the whole cache: rejected under either policy
            continue
        added.append(request)
    preemptions, _ = run(scheduler)
    assert preemptions == 0
    for request in added:
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.metrics.num_preemptions == 0
        assert request.num_output_tokens == request.sampling_params.max_tokens
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_an_unknown_policy_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match="capacity_policy must be one of max-utilization, "
                                         "guaranteed-no-evict, got 'fifo'"):
        SchedulerConfig(num_kv_blocks=8, capacity_policy="fifo")
    with pytest.raises(KilnError, match="capacity_policy"):
        validated(EngineConfig, capacity_policy="fifo")


def test_engine_config_offers_the_schedulers_policies():
    annotation = EngineConfig.model_fields["capacity_policy"].annotation
    assert typing.get_args(annotation) == CAPACITY_POLICIES
    assert EngineConfig().capacity_policy == SchedulerConfig(num_kv_blocks=8).capacity_policy


def test_the_cli_flag_reaches_the_engine_kwargs(capsys):
    import argparse

    from kiln.cli_common import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args(["--capacity-policy", NO_EVICT])) == {
        "capacity_policy": NO_EVICT}
    with pytest.raises(SystemExit):
        parser.parse_args(["--capacity-policy", "fifo"])
    assert "invalid choice: 'fifo'" in capsys.readouterr().err

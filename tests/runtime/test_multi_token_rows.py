"""Multi-token rows: a decode row carrying proposed (speculative) tokens is verified in one
step — logits at each of its 1 + k tokens, k + 1 sampled rows for the request, the accepted
tokens plus the model's own next token back, and the rejected tokens' KV rolled back.

Greedy verification is exact, so whatever the proposals (right, wrong, partly right), the
tokens equal a run without them; what changes is how many steps it takes.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kiln.runtime.messages import ModelRunnerOutput
from kiln.runtime.model_runner import accept_matching
from kiln.runtime.request import RequestStatus
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine, make_cpu_engine, run_to_completion
from tests.runtime.scheduler_helpers import make_request, make_scheduler, step, token_for
from tests.runtime.test_scheduler import (
    MAX_MODEL_LEN,
    add_from_op,
    check_invariants,
    operations,
    property_scheduler,
)

VOCAB = 64


# ---- the scheduler, with fabricated runner outputs ----------------------------------------


def decoding_request(scheduler, prompt_len: int = 7, **params):
    """A request whose prompt has run, so its next row is a decode row."""
    request = make_request("r", list(range(10, 10 + prompt_len)), **params)
    scheduler.add_request(request)
    while not request.num_output_tokens:  # the prompt, maybe in chunks
        step(scheduler)
    assert request.num_computed_tokens == request.num_tokens - 1
    return request


def test_verify_row_rolls_back_rejected_tokens_and_frees_their_blocks():
    scheduler = make_scheduler(block_size=4)
    request = decoding_request(scheduler, max_tokens=20)  # 7 prompt + 1 output = 8 tokens
    blocks_before = list(request.block_ids)  # 2 blocks of 4
    request.spec_token_ids = [50, 51, 52, 53, 54, 55]
    out = scheduler.schedule()
    (chunk,) = out.scheduled
    assert (chunk.num_computed_tokens, chunk.num_scheduled_tokens) == (7, 7)
    assert chunk.spec_token_ids == [50, 51, 52, 53, 54, 55]
    assert chunk.logits_offsets == (0, 1, 2, 3, 4, 5, 6)
    assert scheduler.rows["r"].token_ids == [request.output_token_ids[-1], 50, 51, 52, 53, 54, 55]
    assert request.num_computed_tokens == 14 and len(request.block_ids) == 4  # 14 slots
    assert request.spec_token_ids == []  # consumed
    # Two proposals accepted, then the model's own token: 3 new tokens.
    scheduler.update(out, ModelRunnerOutput({"r": [50, 51, 99]}))
    assert request.output_token_ids[-3:] == [50, 51, 99]
    assert request.num_computed_tokens == 10  # 8 known + 2 accepted; 99 is not computed yet
    assert request.block_ids[:2] == blocks_before and len(request.block_ids) == 3
    scheduler.kv_cache_manager.check_invariants([request])
    # The next row continues at position 10; the runner's table shrinks with the scheduler's
    # (MirroredScheduler checks every row against the scheduler's own state).
    out = scheduler.schedule()
    (chunk,) = out.scheduled
    assert (chunk.num_computed_tokens, chunk.num_scheduled_tokens) == (10, 1)
    assert chunk.new_block_ids_start == 3 and chunk.new_token_ids == [50, 51, 99]
    assert scheduler.rows["r"].token_ids == [99]


def test_all_proposals_accepted_adds_a_bonus_token():
    scheduler = make_scheduler()
    request = decoding_request(scheduler, max_tokens=20)
    request.spec_token_ids = [50, 51]
    out = scheduler.schedule()
    scheduler.update(out, ModelRunnerOutput({"r": [50, 51, 52]}))
    assert request.num_output_tokens == 4 and request.num_computed_tokens == 10
    scheduler.kv_cache_manager.check_invariants([request])


@pytest.mark.parametrize(
    ("knobs", "params", "expected_spec"),
    [
        ({"max_num_batched_tokens": 4}, {"max_tokens": 20}, 3),  # the token budget
        ({}, {"max_tokens": 4}, 2),  # 1 output; verifying k more adds up to k + 1
        ({"max_model_len": 12}, {"max_tokens": None}, 3),  # 8 tokens, 12 at most
    ],
)
def test_proposals_are_cut_to_what_the_limits_leave(knobs, params, expected_spec):
    scheduler = make_scheduler(**knobs)
    request = decoding_request(scheduler, **params)
    request.spec_token_ids = [50, 51, 52, 53, 54, 55]
    (chunk,) = scheduler.schedule().scheduled
    assert len(chunk.spec_token_ids) == expected_spec
    assert chunk.num_scheduled_tokens == 1 + expected_spec


def test_a_prefill_chunk_drops_proposals():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    request = make_request("r", list(range(10, 20)), max_tokens=5)
    scheduler.add_request(request)
    request.spec_token_ids = [1, 2]  # proposals for a request still in its prompt: stale
    (chunk,) = scheduler.schedule().scheduled
    assert not chunk.spec_token_ids and chunk.logits_offsets == ()
    assert request.spec_token_ids == []


def test_a_runner_returning_too_many_tokens_is_an_error():
    scheduler = make_scheduler()
    decoding_request(scheduler, max_tokens=20).spec_token_ids = [50, 51]
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="verified 2 speculative tokens, but the runner "
                                         "returned 4 tokens"):
        scheduler.update(out, ModelRunnerOutput({"r": [50, 51, 52, 53]}))


def test_accept_matching():
    assert accept_matching([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all, plus the bonus
    assert accept_matching([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # the model's token replaces 6
    assert accept_matching([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert accept_matching([], [3]) == [3]


# ---- the engine on a tiny model: greedy verification is exact -----------------------------


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("multi-token"), vocab_size=VOCAB)


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8], list(range(1, 30)), [5]]


def proposer(reference: list[list[int]], kind: str, k: int = 4):
    """Before each step, give every decoding request k proposals continuing its outputs:
    the reference run's next tokens ("right"), wrong ones ("wrong"), or right then wrong."""

    def propose(engine) -> None:
        for index, expected in enumerate(reference):
            request = engine.scheduler.get_request(f"req-{index}")
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens != request.num_tokens - 1:
                continue  # still in its prompt
            done = request.num_output_tokens
            right = expected[done : done + k]
            wrong = [(t + 1) % VOCAB for t in right]
            request.spec_token_ids = {
                "right": right, "wrong": wrong, "mixed": right[:2] + wrong[2:],
            }[kind]

    return propose


@pytest.mark.parametrize("kind", ["right", "wrong", "mixed"])
def test_verification_gives_the_tokens_of_a_run_without_proposals(engine_dir, kind):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2)
              for n in (13, 7, 20, 1)]
    plain = make_cpu_engine(engine_dir, num_kv_blocks=64)
    reference = run_to_completion(plain, PROMPTS, params)
    expected = [r.outputs[0].token_ids for r in reference]

    engine = make_cpu_engine(engine_dir, num_kv_blocks=64)
    idle = engine.scheduler.kv_cache_manager.num_free_blocks
    outputs = run_to_completion(engine, PROMPTS, params, before_step=proposer(expected, kind))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for got, want in zip(outputs, reference):
        got_logprobs, want_logprobs = got.outputs[0].logprobs, want.outputs[0].logprobs
        assert len(got_logprobs) == len(want_logprobs)
        for a, b in zip(got_logprobs, want_logprobs):
            assert a.sampled_token_id == b.sampled_token_id
            assert a.sampled_logprob == pytest.approx(b.sampled_logprob, abs=1e-4)
    if kind == "right":  # up to 5 tokens a step instead of 1
        assert engine.stats.num_steps < plain.stats.num_steps / 2
    assert engine.scheduler.kv_cache_manager.num_free_blocks == idle
    assert len(engine.runner.requests) == 0


def test_a_stop_token_among_accepted_proposals_ends_the_request_there(engine_dir):
    plain = make_cpu_engine(engine_dir, num_kv_blocks=64)
    free_run = run_to_completion(
        plain, [PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    )[0].outputs[0].token_ids
    stop = free_run[5]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])]
    expected = run_to_completion(plain, [PROMPTS[0]], params)[0].outputs[0].token_ids
    assert expected[-1] == stop and len(expected) <= 6
    engine = make_cpu_engine(engine_dir, num_kv_blocks=64)
    output = run_to_completion(engine, [PROMPTS[0]], params,
                               before_step=proposer([free_run], "right", k=6))[0]
    assert output.outputs[0].token_ids == expected
    assert output.outputs[0].finish_reason == "stop"


def test_seeded_sampling_with_proposals_is_reproducible(engine_dir):
    params = [SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=10, ignore_eos=True)]
    runs = []
    for _ in range(2):
        engine = make_cpu_engine(engine_dir, num_kv_blocks=64)
        guess = [[(3 * i) % VOCAB for i in range(10)]]
        output = run_to_completion(engine, [PROMPTS[1]], params,
                                   before_step=proposer(guess, "right", k=3))[0]
        runs.append(output.outputs[0].token_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 10
    assert all(0 <= t < VOCAB for t in runs[0])



# ---- the random add / step / abort property, with proposals -------------------------------


def verify_step(scheduler, proposals: dict[str, list[int]]) -> None:
    """One step with the fabricated model (token_for) verifying proposals exactly: the
    i-th logits row of a verify row is the model's token after the first i proposals."""
    for request_id, proposed in proposals.items():
        scheduler.get_request(request_id).spec_token_ids = list(proposed)
    out = scheduler.schedule()
    sampled = {}
    for chunk in out.scheduled:
        positions = [chunk.num_computed_tokens + offset + 1 for offset in chunk.logits_offsets]
        tokens = [token_for(chunk.request_id, position) for position in positions]
        if chunk.spec_token_ids:
            tokens = accept_matching(list(chunk.spec_token_ids), tokens)
        if tokens:
            sampled[chunk.request_id] = tokens
    scheduler.update(out, ModelRunnerOutput(sampled_token_ids=sampled))


@settings(max_examples=100, deadline=None)
@given(operations, st.integers(3, 16), st.sampled_from([5, 6, 8, 16]), st.booleans(),
       st.randoms(use_true_random=False))
def test_random_workloads_with_proposals_keep_every_invariant(
    ops, budget, num_kv_blocks, prefix_caching, rng
):
    """Right, wrong and partly right proposals on random add / step / abort mixes: outputs
    are exactly the model's tokens, limits hold, rollbacks leak no block, and (through
    MirroredScheduler) the runner's view of every row matches the scheduler's."""
    scheduler = property_scheduler(budget, num_kv_blocks, prefix_caching)
    kv = scheduler.kv_cache_manager
    added = []

    def proposals() -> dict[str, list[int]]:
        chosen = {}
        for request in scheduler._running:
            if request.num_computed_tokens != request.num_tokens - 1 or rng.random() < 0.3:
                continue
            k = rng.randint(1, 5)
            start = request.num_tokens  # the first proposed token's position
            right = [token_for(request.request_id, start + i) for i in range(k)]
            cut = rng.randint(0, k)  # right up to here, wrong after
            chosen[request.request_id] = right[:cut] + [t + 1 for t in right[cut:]]
            event(f"proposals right {cut} of {k}")
        return chosen

    for op in ops:
        if op[0] == "add":
            add_from_op(scheduler, added, op)
        elif op[0] == "step":
            verify_step(scheduler, proposals())
        elif added:
            scheduler.abort_request(added[op[1] % len(added)].request_id)
        check_invariants(scheduler)
    for _ in range(500):
        if not scheduler.has_unfinished_requests():
            break
        verify_step(scheduler, proposals())
        check_invariants(scheduler)
    assert not scheduler.has_unfinished_requests()
    scheduler.schedule()
    assert kv.num_free_blocks == kv.num_usable_blocks
    for request in added:
        assert request.num_output_tokens <= request.sampling_params.max_tokens
        assert request.num_tokens <= MAX_MODEL_LEN
        if request.status is not RequestStatus.FINISHED_ABORTED:
            start = request.num_prompt_tokens
            assert request.output_token_ids == [
                token_for(request.request_id, start + i) for i in range(request.num_output_tokens)
            ]

"""Speculative decoding in the engine, on random-weight HF-parity tiny models (CPU).

Greedy verification is exact, so with either proposer (n-gram lookup; a draft engine: the
target itself, which agrees, or a smaller random model, which mostly does not) and any k the
tokens equal a run without speculation: at batch 1 and 32, with chunked prefill and
preemption forced, prefix caching on and off. Logprobs of accepted tokens are the plain
run's; seeded sampling stays reproducible; blocks (the target's and the draft's) return to
baseline after aborts.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.compiler.manifest import open_engine
from kiln.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine, run_to_completion

VOCAB = 64


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-engines")
    # A small vocabulary makes random models repeat themselves: n-gram lookup then finds
    # continuations that are sometimes right.
    target = build_tiny_engine(root / "target", vocab_size=VOCAB, num_hidden_layers=2)
    # Another random model of the same family and vocabulary, fewer layers: a poor draft.
    small = build_tiny_engine(root / "small", vocab_size=VOCAB, num_hidden_layers=1,
                              hidden_size=16, intermediate_size=32)
    return {"target": target, "small": small}


def make_engine(path, speculative=None, **knobs):
    knobs = {"device": "cpu", "block_size": 4, "num_kv_blocks": 96, "cpu_kv_cache_bytes": 1 << 20,
             **knobs}
    return LLMEngine(open_engine(path), EngineConfig(**knobs), speculative)


def prompts_and_params(batch: int, seed: int = 0, max_tokens: int = 12, **extra):
    rng = random.Random(seed)
    prompts, params = [], []
    for _ in range(batch):
        motif = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 5))]
        prompts.append((motif * 6)[: rng.randint(3, 22)])  # repetitive: n-gram hits
        params.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, max_tokens),
                                     ignore_eos=True, **extra))
    return prompts, params


_REFERENCE: dict = {}


def reference_tokens(path, prompts, params, **knobs):
    key = (str(path), repr(prompts), repr(params))
    if key not in _REFERENCE:
        outputs = run_to_completion(make_engine(path, **knobs), prompts, params)
        _REFERENCE[key] = outputs
    return _REFERENCE[key]


def spec(method: str, k: int, engines, **extra):
    config = {"method": method, "num_speculative_tokens": k, "adaptive": False, **extra}
    if method == "draft-self":
        config.update(method="draft", model=str(engines["target"]))
    elif method == "draft-small":
        config.update(method="draft", model=str(engines["small"]))
    return config


def check_same(engine, path, prompts, params):
    kv = engine.scheduler.kv_cache_manager
    idle = kv.num_free_blocks
    expected = reference_tokens(path, prompts, params)
    outputs = run_to_completion(engine, prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert kv.num_free_blocks == idle
    assert len(engine.runner.requests) == 0
    proposer = engine.speculator.proposer
    if hasattr(proposer, "kv"):  # the draft's cache is empty again too
        assert proposer.kv.num_free_blocks == proposer.kv.num_usable_blocks
    return outputs


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("method", ["ngram", "draft-self"])
def test_batch_1_greedy_tokens_equal_a_run_without_speculation(engines, method, k):
    prompts = [[5, 9, 2] * 4, [7, 7, 1, 3, 7]]
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)] * 2
    engine = make_engine(engines["target"], spec(method, k, engines))
    check_same(engine, engines["target"], prompts[:1], params[:1])
    check_same(engine, engines["target"], prompts[1:], params[1:])  # one after another
    if method == "draft-self":  # the draft is the target: every proposal is accepted
        stats = engine.speculator.stats
        assert stats.num_accepted_tokens == stats.num_proposed_tokens > 0


@pytest.mark.parametrize(("method", "knobs"), [
    ("draft-small", {}),
    ("ngram", {"max_num_batched_tokens": 16}),  # chunked prefill, verify rows cut by budget
    ("draft-self", {"max_num_batched_tokens": 16}),
    ("ngram", {"num_kv_blocks": 14}),  # preemption by recompute
    ("draft-self", {"num_kv_blocks": 14}),
    ("ngram", {"enable_prefix_caching": False}),
], ids=["draft-small", "ngram-chunked-prefill", "draft-chunked-prefill", "ngram-preemption",
        "draft-preemption", "ngram-no-prefix-cache"])
def test_batch_32_greedy_tokens_equal_a_run_without_speculation(engines, method, knobs):
    prompts, params = prompts_and_params(32, seed=7)
    engine = make_engine(engines["target"], spec(method, 4, engines), **knobs)
    outputs = check_same(engine, engines["target"], prompts, params)
    assert engine.speculator.stats.num_verify_rows > 0
    if "num_kv_blocks" in knobs:
        assert sum(m.num_preemptions for o in outputs for m in o.metrics) > 0


def test_logprobs_n_and_mixed_greedy_and_sampled_requests(engines):
    """Logprobs of accepted tokens are the plain run's; n > 1 sequences; a sampled request
    (rejection sampling) in the same batches as greedy ones."""
    prompts, params = prompts_and_params(4, seed=3, logprobs=2)
    plain = reference_tokens(engines["target"], prompts, params)
    engine = make_engine(engines["target"], spec("draft-self", 3, engines))
    sampled = SamplingParams(temperature=1.0, top_k=8, seed=11, max_tokens=12, ignore_eos=True, n=2)
    outputs = run_to_completion(engine, prompts + [prompts[0]], params + [sampled])
    for got, want in zip(outputs, plain):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert a.sampled_token_id == b.sampled_token_id
            assert a.sampled_logprob == pytest.approx(b.sampled_logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert len(got.outputs[0].logprobs) == len(got.outputs[0].token_ids)
    random_output = outputs[-1]
    assert [len(c.token_ids) for c in random_output.outputs] == [12, 12]
    assert random_output.outputs[0].token_ids != random_output.outputs[1].token_ids


@pytest.mark.parametrize("method", ["ngram", "draft-self"])
def test_seeded_sampling_with_speculation_is_reproducible(engines, method):
    prompts, _ = prompts_and_params(3, seed=5)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=10, ignore_eos=True)
              for i in range(3)]
    runs = []
    for batch in (prompts, prompts[:1]):  # the first request's tokens do not depend on the batch
        engine = make_engine(engines["target"], spec(method, 4, engines))
        runs.append([o.outputs[0].token_ids for o in run_to_completion(engine, batch, params)])
    assert runs[0][0] == runs[1][0]
    engine = make_engine(engines["target"], spec(method, 4, engines))
    again = [o.outputs[0].token_ids for o in run_to_completion(engine, prompts, params)]
    assert again == runs[0]


def test_max_tokens_and_max_model_len_are_never_overshot(engines):
    engine = make_engine(engines["target"], spec("draft-self", 8, engines), max_model_len=30)
    prompts = [[1, 2, 3] * 8, [4, 5]]
    params = [SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    outputs = run_to_completion(engine, prompts, params)
    assert len(outputs[0].outputs[0].token_ids) == 30 - 24
    assert len(outputs[1].outputs[0].token_ids) == 5
    assert outputs[0].outputs[0].finish_reason == outputs[1].outputs[0].finish_reason == "length"


def test_streaming_deltas_carry_several_tokens(engines):
    engine = make_engine(engines["target"], spec("draft-self", 4, engines))
    engine.add_request("r", {"prompt_token_ids": [3, 1, 4, 1, 5]},
                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    deltas = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            deltas.append(output.outputs[0].delta_token_ids)
    assert sum(len(d) for d in deltas) == 20
    assert max(len(d) for d in deltas) == 5  # 4 accepted + the bonus token


def test_adaptive_k_stops_speculating_when_nothing_is_accepted(engines):
    engine = make_engine(engines["target"], {"method": "random", "num_speculative_tokens": 4})
    prompts, _ = prompts_and_params(2, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 2
    expected = reference_tokens(engines["target"], prompts, params)
    outputs = run_to_completion(engine, prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    stats = engine.speculator.stats
    # Without adaptive k: 4 proposals on each of the ~30 steps of each request (240). With
    # it, a few steps of proposals until the acceptance estimate falls.
    assert 0 < stats.num_proposed_tokens < 240 / 4


def test_500_random_speculative_requests_with_aborts_free_every_block(engines):
    """Greedy and sampled requests, random proposals (nearly all rejected: every verify row
    rolls back) and random aborts: the free blocks come back to baseline and the runner
    holds nothing. (The draft's own rollback is checked by the tests above and the property
    test below.)"""
    engine = make_engine(engines["target"], spec("random", 3, engines), num_kv_blocks=40,
                         max_num_seqs=32)
    kv = engine.scheduler.kv_cache_manager
    idle = kv.num_free_blocks
    rng = random.Random(0)
    live: list[str] = []
    for index in range(500):
        temperature = rng.choice([0.0, 1.0])
        params = SamplingParams(temperature=temperature, top_k=rng.choice([-1, 5]),
                                max_tokens=rng.randint(1, 5), ignore_eos=True)
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        live.append(engine.add_request(f"r{index}", {"prompt_token_ids": prompt}, params))
        if rng.random() < 0.1:
            for _ in range(rng.randint(1, 4)):
                engine.step()
        if rng.random() < 0.15 and live:
            engine.abort_request(live.pop(rng.randrange(len(live))))
    while engine.has_unfinished_requests():
        engine.step()
    assert kv.num_free_blocks == idle
    assert len(engine.runner.requests) == 0
    assert engine.speculator.stats.num_verify_rows > 100


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(0, 63)),
                min_size=1, max_size=25),
       st.sampled_from(["ngram", "draft-self", "draft-small"]), st.integers(1, 6),
       st.sampled_from([12, 64]), st.sampled_from([20, 96]))
def test_random_add_step_abort_with_speculation_keeps_outputs_and_blocks(
    engines, ops, method, k, budget, num_kv_blocks
):
    """Random mixes of adds, steps and aborts: every request that finishes has the plain
    run's tokens, and the target's and draft's caches end empty."""
    engine = make_engine(engines["target"], spec(method, k, engines),
                         max_num_batched_tokens=budget, num_kv_blocks=num_kv_blocks)
    kv = engine.scheduler.kv_cache_manager
    idle = kv.num_free_blocks
    requests = {}
    finished = {}
    aborted = set()
    for op, value in ops:
        if op == "add":
            request_id = f"q{len(requests)}"
            prompt = [(value * 7 + i) % VOCAB for i in range(1 + value % 9)] * 2
            params = SamplingParams(temperature=0, max_tokens=1 + value % 12, ignore_eos=True)
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
            requests[request_id] = (prompt, params)
        elif op == "step":
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
        elif requests:
            request_id = sorted(requests)[value % len(requests)]
            if request_id not in finished and engine.abort_request(request_id):
                aborted.add(request_id)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert kv.num_free_blocks == idle
    proposer = engine.speculator.proposer
    if hasattr(proposer, "kv"):
        assert proposer.kv.num_free_blocks == proposer.kv.num_usable_blocks
    for request_id, tokens in finished.items():
        prompt, params = requests[request_id]
        (expected,) = reference_tokens(engines["target"], [prompt], [params])
        assert tokens == expected.outputs[0].token_ids

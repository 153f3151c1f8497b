"""Overlap scheduling end to end on the CPU (tiny random Llama, reference kernels): the
engine schedules and launches step N+1 before collecting step N, feeding the model
placeholders that the runner fills from the previous step's sampled ids. Whatever the
batch, chunking, preemption, stops and aborts, the tokens must equal synchronous steps."""

from __future__ import annotations

from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import make_cpu_engine, run_to_completion
from tests.runtime.test_engine import random_prompts, tiny  # noqa: F401 (a fixture)


def token_ids(outputs) -> list[list[list[int]]]:
    return [[completion.token_ids for completion in output.outputs] for output in outputs]


def test_overlap_equals_synchronous_under_chunking_preemption_and_stops(tiny):  # noqa: F811
    _, engine_dir = tiny
    prompts = random_prompts(48, seed=5)
    # 19 usable blocks of 4 tokens for requests of up to 14 blocks: preemption is certain.
    knobs = dict(max_num_batched_tokens=24, num_kv_blocks=20, max_num_seqs=32)
    plain = [SamplingParams(temperature=0, max_tokens=4 + i % 13, ignore_eos=True) for i in range(48)]
    reference = run_to_completion(make_cpu_engine(engine_dir, overlap_scheduling=False, **knobs), prompts, plain)
    overlapped_plain = run_to_completion(make_cpu_engine(engine_dir, overlap_scheduling=True, **knobs), prompts, plain)
    assert token_ids(overlapped_plain) == token_ids(reference)
    assert sum(m.num_preemptions for out in overlapped_plain for m in out.metrics) > 0
    # Stop on the token each request produced 2nd or 4th, so stops land while the next
    # step is already launched; min_tokens delays some of them past pending tokens.
    params = []
    for i, output in enumerate(reference):
        tokens = output.outputs[0].token_ids
        stop = tokens[min(1 + 2 * (i % 2), len(tokens) - 1)]
        params.append(SamplingParams(
            temperature=0, max_tokens=4 + i % 13, stop_token_ids=[stop], min_tokens=i % 3,
        ))
    synchronous = make_cpu_engine(engine_dir, overlap_scheduling=False, **knobs)
    overlapped = make_cpu_engine(engine_dir, overlap_scheduling=True, **knobs)
    expected = run_to_completion(synchronous, prompts, params)
    got = run_to_completion(overlapped, prompts, params)
    assert token_ids(got) == token_ids(expected)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in expected]
    assert any(o.outputs[0].finish_reason == "stop" for o in got)
    manager = overlapped.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
    assert not overlapped.has_unfinished_requests()


def test_overlap_seeded_sampling_logprobs_and_penalties_match(tiny):  # noqa: F811
    _, engine_dir = tiny
    prompts = [[1, 2, 3, 4, 5], [9, 9, 9], [4, 4], [7, 8]]
    params = [
        SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, top_k=5, max_tokens=9, ignore_eos=True),
        # Penalties need every earlier token on the host: those steps run synchronously.
        SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=7, ignore_eos=True),
    ]
    expected = run_to_completion(make_cpu_engine(engine_dir, overlap_scheduling=False), prompts, params)
    got = run_to_completion(make_cpu_engine(engine_dir, overlap_scheduling=True), prompts, params)
    assert token_ids(got) == token_ids(expected)
    assert got[1].outputs[0].logprobs == expected[1].outputs[0].logprobs


def test_overlap_abort_while_a_step_is_in_flight(tiny):  # noqa: F811
    _, engine_dir = tiny
    engine = make_cpu_engine(engine_dir, overlap_scheduling=True, num_kv_blocks=40)
    manager = engine.scheduler.kv_cache_manager
    idle = manager.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    keep = engine.add_request(None, [3, 1, 4, 1, 5], params)
    doomed = [engine.add_request(None, list(range(1, 30)), params) for _ in range(2)]
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None  # a launched step holds both doomed requests
    for request_id in doomed:
        assert engine.abort_request(request_id)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == keep  # nothing more from the aborted ones
            if output.finished:
                finished[output.request_id] = output
    [alone] = run_to_completion(make_cpu_engine(engine_dir, overlap_scheduling=False), [[3, 1, 4, 1, 5]], [params])
    assert finished[keep].outputs[0].token_ids == alone.outputs[0].token_ids
    assert manager.num_free_blocks == idle
    assert len(engine.runner.requests) == 0 and len(engine.runner.generators) == 0

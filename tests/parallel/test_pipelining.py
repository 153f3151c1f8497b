"""Pipeline micro-batches: at pp > 1 the engine keeps up to pp steps of disjoint requests in
flight, so the stages work on different micro-batches at the same time.

The engine's side (scheduling, collecting in order, the same tokens whatever is in flight)
is tested in one process with the micro-batch loop forced on a tp 1 engine; the stages'
overlap on a real pp 2 engine (gloo), with each stage made to "compute" for a while
(KILN_TEST_STAGE_DELAY_S) and to note when (KILN_TEST_STAGE_TRACE).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig
from kiln.parallel.state import STAGE_DELAY_ENV, STAGE_TRACE_ENV
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import make_cpu_engine, run_to_completion, save_tiny_hf_model, tiny_llama_config
from tests.runtime.test_engine import VOCAB, random_prompts, tiny  # noqa: F401 (a fixture)

# Long next to the host's own work between a stage's steps (scheduling, the tiny model's
# layers: tens of ms on a loaded 2-core machine), so the overlap does not hang on the
# machine's load: at 0.05 s, one run beside three CPU-bound builds read the stages in lockstep.
DELAY_S = 0.2


def token_ids(outputs) -> list[list[list[int]]]:
    return [[completion.token_ids for completion in output.outputs] for output in outputs]


def _micro_batched(engine, depth: int):
    """The engine with its pipeline loop on (what pp = depth gives), on one process."""
    engine._max_in_flight = depth
    return engine


def _count_preemptions_in_flight(engine) -> list[str]:
    """The requests the scheduler preempts while one of the engine's steps in flight holds
    them (filled in as it runs)."""
    victims: list[str] = []
    preempt = engine.scheduler._preempt

    def recording_preempt(request):
        if any(chunk.request_id == request.request_id
               for output, _ in engine._in_flight for chunk in output.scheduled):
            victims.append(request.request_id)
        preempt(request)

    engine.scheduler._preempt = recording_preempt
    return victims


@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "chained"])
def test_micro_batches_give_the_tokens_of_single_steps(tiny, overlap):  # noqa: F811
    """Chunking, preemption, stops, seeded sampling, logprobs and penalties: micro-batches of
    disjoint requests, three in flight, give exactly the tokens of one step at a time; with
    overlap scheduling, also once fewer requests than three are left and steps chain."""
    _, engine_dir = tiny
    prompts = random_prompts(24, seed=9)
    knobs = dict(max_num_batched_tokens=24, num_kv_blocks=20, max_num_seqs=12)
    micro_knobs = dict(knobs, overlap_scheduling=overlap)
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 11, ignore_eos=True)
              for i in range(24)]
    params[1] = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=9, ignore_eos=True)
    params[2] = SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)
    params[3] = SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=7,
                               ignore_eos=True)
    expected = run_to_completion(make_cpu_engine(engine_dir, **knobs), prompts, params)
    engine = _micro_batched(make_cpu_engine(engine_dir, **micro_knobs), 3)
    in_flight: list[int] = []
    marked: list[bool] = []
    preempted_in_flight = _count_preemptions_in_flight(engine)

    def watch(engine):
        in_flight.append(len(engine._in_flight))
        marked.extend(output.share_sampled_ids for output, _ in engine._in_flight)

    got = run_to_completion(engine, prompts, params, before_step=watch)
    assert token_ids(got) == token_ids(expected)
    assert got[2].outputs[0].logprobs == expected[2].outputs[0].logprobs
    assert sum(m.num_preemptions for out in got for m in out.metrics) > 0
    assert preempted_in_flight  # a request preempted while a step of it was in flight
    assert max(in_flight) == 2  # between step() calls: depth - 1 (the next one launches)
    assert any(marked) == overlap
    manager = engine.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
    # Stops land while other micro-batches are in flight.
    stops = []
    for index, output in enumerate(expected[4:], start=4):
        tokens = output.outputs[0].token_ids
        stops.append(SamplingParams(temperature=0, max_tokens=3 + index % 11,
                                    stop_token_ids=[tokens[min(2, len(tokens) - 1)]]))
    reference = run_to_completion(make_cpu_engine(engine_dir, **knobs), prompts[4:], stops)
    got = run_to_completion(_micro_batched(make_cpu_engine(engine_dir, **micro_knobs), 3),
                            prompts[4:], stops)
    assert token_ids(got) == token_ids(reference)
    assert ([o.outputs[0].finish_reason for o in got]
            == [o.outputs[0].finish_reason for o in reference])


def test_a_micro_batch_holds_its_share_of_the_requests_and_none_twice(tiny):  # noqa: F811
    _, engine_dir = tiny
    engine = _micro_batched(make_cpu_engine(engine_dir, max_num_seqs=8), 2)
    for index in range(5):
        engine.add_request(f"r{index}", [1 + index, 2, 3],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    launched = []
    launch = engine.runner.execute_async

    def recording_launch(scheduler_output):
        ids = [chunk.request_id for chunk in scheduler_output.scheduled]
        in_flight = {chunk.request_id for output, _ in engine._in_flight
                     for chunk in output.scheduled}
        assert not in_flight & set(ids)  # a request is in one micro-batch at a time
        launched.append(ids)
        return launch(scheduler_output)

    engine.runner.execute_async = recording_launch
    assert engine.step() == []  # the first micro-batch launched; room for a second
    engine.step()
    assert launched[:2] == [["r0", "r1", "r2"], ["r3", "r4"]]  # ceil(5 / 2), then the rest
    while engine.has_unfinished_requests():
        engine.step()
    assert sum(len(ids) for ids in launched) == 5 * 4  # a prefill and 3 decodes each


@pytest.fixture(scope="module")
def pipeline_engines(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("pipelining")
    save_tiny_hf_model(tiny_llama_config(num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=VOCAB), root / "hf")
    built = {}
    for pp in (1, 2):
        built[pp] = root / f"pp{pp}"
        build_engine(root / "hf", built[pp], BuildConfig(dtype="float32"), progress=False, pp=pp)
    return built


def _generate(engine_dir: Path, count: int = 4, **knobs) -> list[list[list[int]]]:
    prompts = random_prompts(count, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * count
    with make_cpu_engine(engine_dir, **knobs) as engine:
        return token_ids(run_to_completion(engine, prompts, params))


def test_one_request_chains_its_steps_through_the_pipeline(pipeline_engines):
    """Fewer requests than stages, overlap on: step N + 1 of the same request is launched
    while step N is in the pipeline; stage 0 fills its placeholder from the ids the last
    stage sent. Same tokens; closing with a marked step in flight leaves nothing behind."""
    expected = _generate(pipeline_engines[1], count=1)
    assert _generate(pipeline_engines[2], count=1, overlap_scheduling=True) == expected
    engine = make_cpu_engine(pipeline_engines[2], overlap_scheduling=True)
    processes = engine.runner.processes
    try:
        engine.add_request("one", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20))
        engine.step()
        engine.step()
        assert len(engine._in_flight) == 1
        assert engine._in_flight[0][0].share_sampled_ids
        assert [chunk.request_id for chunk in engine._in_flight[0][0].scheduled] == ["one"]
    finally:
        engine.close()
    for process in processes:
        assert process.wait(timeout=10) == 0  # a clean shutdown, not a kill


def test_pipeline_stages_compute_different_micro_batches_at_once(pipeline_engines, tmp_path,
                                                                 monkeypatch):
    expected = _generate(pipeline_engines[1])
    trace = tmp_path / "stages.txt"
    monkeypatch.setenv(STAGE_DELAY_ENV, str(DELAY_S))
    monkeypatch.setenv(STAGE_TRACE_ENV, str(trace))
    assert _generate(pipeline_engines[2]) == expected
    intervals = {0: [], 1: []}
    for line in trace.read_text().splitlines():
        stage, start, end = line.split()
        intervals[int(stage)].append((float(start), float(end)))
    assert len(intervals[0]) == len(intervals[1]) >= 6  # stage 0 = rank 0, stage 1 = worker
    # Structural: stage 0 computed one micro-batch while stage 1 computed another. One
    # step through both stages, one at a time, could never overlap.
    overlaps = [min(end0, end1) - max(start0, start1)
                for start0, end0 in intervals[0] for start1, end1 in intervals[1]]
    assert max(overlaps) > DELAY_S / 2, intervals
    # Loose: the stages' busy time together exceeds the time either was busy (at one step at
    # a time they would add up); host overhead between the intervals does not count.
    every = sorted(intervals[0] + intervals[1])
    busy = sum(end - start for start, end in every)
    union, reach = 0.0, float("-inf")
    for start, end in every:
        union += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    assert union < 0.9 * busy, (union, busy)

"""The whole engine at tp 2 (and, with -m slow_parallel, pp 2 and tp 2 × pp 2) on gloo gives
the same tokens as tp 1: chunked prefill, preemption, prefix reuse, abort and n > 1 in one
run, through the real executor (worker processes spawned by the engine, step messages as
msgpack bytes). Also: the engine refuses a layout it was not built for, the KV cache is the
smallest fit of all ranks, and closing the engine leaves no worker behind, and no process
group for the collector to destroy later.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig, EngineConfig
from kiln.errors import KilnError
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import make_cpu_engine, run_to_completion, save_tiny_hf_model, tiny_llama_config

VOCAB = 128
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parallel-engine")
    config = tiny_llama_config(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                               tie_word_embeddings=True)
    save_tiny_hf_model(config, root / "hf")
    built = {}
    for tp, pp in [(1, 1), *LAYOUTS]:
        built[(tp, pp)] = root / f"tp{tp}-pp{pp}"
        build_engine(root / "hf", built[(tp, pp)], BuildConfig(dtype="float32"), progress=False,
                     tp=tp, pp=pp)
    return built


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    lengths = [37, 5, 22, 13, 29, 9]
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def run_matrix(engine_dir, **knobs) -> dict:
    """One engine, every feature: a 24-token budget (prompts of up to 37 tokens are chunked),
    a 24-block pool (preemption), a prefix shared by two requests run one after the other
    (reuse), n = 2 seeded sampling, and a request aborted mid-run."""
    results: dict = {"preemptions": 0}
    with make_cpu_engine(engine_dir, max_num_batched_tokens=24, num_kv_blocks=24,
                         max_num_seqs=8, **knobs) as engine:
        prompts = _prompts()
        greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
        for index, prompt in enumerate(prompts):
            engine.add_request(f"greedy-{index}", {"prompt_token_ids": prompt}, greedy)
        engine.add_request("sampled", {"prompt_token_ids": prompts[1]},
                           SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=10,
                                          ignore_eos=True))
        engine.add_request("aborted", {"prompt_token_ids": prompts[3]}, greedy)
        _count_steps_in_flight(engine, results)
        steps = 0
        while engine.has_unfinished_requests():
            if steps == 3:
                assert engine.abort_request("aborted")
            for output in engine.step():
                if output.finished:
                    results[output.request_id] = [c.token_ids for c in output.outputs]
                    results["preemptions"] += sum(m.num_preemptions for m in output.metrics)
            steps += 1
        # Prefix reuse: two prompts sharing 16 tokens (4 blocks), one after the other.
        for name, tail in (("first", [1, 2, 3]), ("reused", [4, 5, 6, 7])):
            engine.add_request(name, {"prompt_token_ids": prompts[0][:16] + tail}, greedy)
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[name] = [c.token_ids for c in output.outputs]
                        results[f"{name}-cached"] = output.metrics[0].num_cached_prompt_tokens
    return results


def _count_steps_in_flight(engine, results: dict) -> None:
    """results["most_in_flight"]: the most steps with rows launched and not yet collected
    at once (the runner's launches and collects, counted)."""
    results["most_in_flight"] = results["chained"] = 0
    runner = engine.runner
    launch, collect = runner.execute_async, runner.collect
    uncollected: dict[int, set[str]] = {}  # id(launched) → its requests

    def counting_launch(scheduler_output):
        ids = {chunk.request_id for chunk in scheduler_output.scheduled}
        results["chained"] += any(ids & other for other in uncollected.values())
        launched = launch(scheduler_output)
        if not scheduler_output.is_empty:
            uncollected[id(launched)] = ids
            results["most_in_flight"] = max(results["most_in_flight"], len(uncollected))
        return launched

    def counting_collect(launched):
        uncollected.pop(id(launched), None)
        return collect(launched)

    runner.execute_async, runner.collect = counting_launch, counting_collect


@pytest.fixture(scope="module")
def reference(engines) -> dict:
    results = run_matrix(engines[(1, 1)])
    assert results["preemptions"] > 0 and results["reused-cached"] == 16  # the matrix is exercised
    assert "aborted" not in results
    return results


@pytest.mark.parametrize("layout", [
    pytest.param(layout, id=f"tp{layout[0]}-pp{layout[1]}",
                 marks=[] if layout == (2, 1) else [pytest.mark.slow_parallel])
    for layout in LAYOUTS
])
def test_engine_matrix_matches_tp1(engines, reference, layout):
    results = run_matrix(engines[layout])
    # Pipelines run pp micro-batches of disjoint requests: another schedule, so another
    # number of preemptions, but the same tokens.
    assert results.pop("preemptions") > 0
    assert results.pop("most_in_flight") == layout[1]
    assert results.pop("chained") == 0  # a request is in one step at a time
    expected = {k: v for k, v in reference.items()
                if k not in ("preemptions", "most_in_flight", "chained")}
    assert results == expected


@pytest.mark.parametrize("layout", [
    pytest.param((1, 2), id="tp1-pp2"),
    pytest.param((2, 2), id="tp2-pp2", marks=pytest.mark.slow_parallel),
])
def test_engine_matrix_overlapped_pipeline_matches_tp1(engines, reference, layout):
    """pp 2 with overlap scheduling: micro-batches while there are requests enough, then
    (fewer live requests than stages, at the end of each part) chained steps whose
    placeholders stage 0 fills from the ids the last stage sends it."""
    results = run_matrix(engines[layout], overlap_scheduling=True)
    assert results.pop("preemptions") > 0
    assert results.pop("most_in_flight") == 2
    assert results.pop("chained") > 0  # a request scheduled again while in flight
    expected = {k: v for k, v in reference.items()
                if k not in ("preemptions", "most_in_flight", "chained")}
    assert results == expected


def test_engine_matrix_overlapped_at_tp2_matches_tp1(engines, reference):
    """Overlap scheduling at tp 2: step N + 1 is launched before step N is collected, its
    placeholders filled on both ranks from the ids the sampling rank broadcasts."""
    results = run_matrix(engines[(2, 1)], overlap_scheduling=True)
    assert results.pop("most_in_flight") == 2  # step N + 1 launched before N was collected
    assert results.pop("chained") > 0
    assert results == {k: v for k, v in reference.items() if k not in ("most_in_flight", "chained")}


def test_layout_mismatch_is_refused_with_the_fix(engines):
    with pytest.raises(KilnError) as error:
        make_cpu_engine(engines[(2, 1)], tensor_parallel_size=1)
    message = str(error.value)
    assert "is built for tp 2 × pp 1, not tp 1 × pp 1" in message
    assert "--tp 2 --pp 1" in message
    with pytest.raises(KilnError, match="built for tp 1 × pp 1, not tp 2 × pp 1"):
        make_cpu_engine(engines[(1, 1)], tensor_parallel_size=2)


def test_kv_cache_is_the_smallest_fit_and_close_leaves_no_worker(engines):
    # pp 2 over 3 layers: stage 0 holds 2 layers, stage 1 one; the same byte budget fits
    # twice the blocks on stage 1, and both must use stage 0's count.
    engine = make_cpu_engine(engines[(1, 2)], cpu_kv_cache_bytes=1 << 20)
    try:
        runner = engine.runner
        spec = runner.kv_cache_spec
        assert spec.num_layers == 2
        assert runner.num_kv_blocks == (1 << 20) // spec.bytes_per_block(4)
        assert engine.scheduler.kv_cache_manager.num_free_blocks == runner.num_kv_blocks - 1
        pids = [process.pid for process in runner.processes]
        assert len(pids) == 1
        assert engine.overlap_scheduling is False
    finally:
        engine.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _gloo_threads() -> int:
    """This process's gloo threads: a live group has two workers and an I/O loop."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sum(name.startswith(("pt_gloo", "gloo_")) for name in names)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from /proc")
def test_close_destroys_the_groups_itself_not_the_collector(engines):
    """A gloo group is destroyed only once its pending operations end, so close() destroys
    the world's groups itself, in its leave-world thread: with the collector off, the gloo
    threads are gone when close() returns (left to the collector, they were destroyed by
    whichever thread collected next: once the suite's main thread, for 15 minutes). Rank 0's
    control group waits at most the step timeout once started; after close the engine's
    state refuses collectives by name."""
    gc.collect()
    before = _gloo_threads()
    gc.disable()
    try:
        engine = make_cpu_engine(engines[(2, 1)])
        world = engine.runner.world
        assert _gloo_threads() > before
        # (no local keeps the backend: it would keep the group alive)
        timeout = world.control_group._get_backend(torch.device("cpu")).options._timeout
        assert timeout == timedelta(seconds=engine.runner.spec.step_timeout_s)
        greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        run_to_completion(engine, _prompts()[:2], [greedy] * 2)
        engine.close()
        assert _gloo_threads() <= before  # (another test's group may have ended meanwhile)
    finally:
        gc.enable()
    assert world.control_group is None and world.result_group is None
    with pytest.raises(RuntimeError, match="left its world"):
        engine.parallel.all_reduce(torch.ones(2))


def test_control_timeout_is_bounded_on_a_torch_without_set_timeout(engines, monkeypatch):
    """Before ProcessGroup.set_timeout (torch older than the CI's; the device machine runs
    2.11), rank 0 bounds its control group through the gloo backend's own setter."""
    import torch.distributed as dist

    monkeypatch.delattr(dist.ProcessGroup, "set_timeout")
    with make_cpu_engine(engines[(2, 1)]) as engine:
        backend = engine.runner.world.control_group._get_backend(torch.device("cpu"))
        timeout, backend = backend.options._timeout, None  # (no local keeps the group alive)
        assert timeout == timedelta(seconds=engine.runner.spec.step_timeout_s)


def test_engine_config_fields():
    config = EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    assert (config.tensor_parallel_size, config.pipeline_parallel_size) == (2, 2)
    with pytest.raises(ValueError):
        EngineConfig(tensor_parallel_size=0)


@pytest.mark.slow_parallel
def test_quantized_sharded_engine_matches_tp1(tmp_path):
    """int8 weight-only, quantised per rank after slicing: the same greedy tokens as tp 1."""
    save_tiny_hf_model(tiny_llama_config(num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=VOCAB), tmp_path / "hf")
    tokens = {}
    for tp in (1, 2):
        build_engine(tmp_path / "hf", tmp_path / f"tp{tp}",
                     BuildConfig(dtype="float32", quant="int8-wo"), progress=False, tp=tp)
        with make_cpu_engine(tmp_path / f"tp{tp}") as engine:
            outputs = run_to_completion(
                engine, _prompts()[:3],
                [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 3)
        tokens[tp] = [o.outputs[0].token_ids for o in outputs]
    assert tokens[2] == tokens[1]

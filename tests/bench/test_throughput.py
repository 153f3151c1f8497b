"""The offline throughput bench's two runs on a tiny engine: every request produces its
output length, and the figures it reports are there and consistent."""

from __future__ import annotations

import pytest

from kiln.bench.datasets import synthetic_requests
from kiln.bench.throughput import run_batched, run_sequential
from kiln.compiler.manifest import open_engine
from kiln.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from tests.helpers import build_tiny_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    engine_dir = build_tiny_engine(tmp_path_factory.mktemp("throughput"))
    config = EngineConfig(device="cpu", block_size=4, num_kv_blocks=128, max_num_seqs=4)
    return LLMEngine(open_engine(engine_dir), config)


def test_batched_and_sequential_runs_produce_every_token(engine):
    requests = synthetic_requests(6, 5, 3, vocab_size=64, seed=0)
    batched = run_batched(engine, requests)
    assert batched["output_tokens"] == 6 * 3 and batched["prompt_tokens"] == 6 * 5
    assert batched["steps"] >= 3 and batched["preemptions"] == 0
    assert batched["output_tok_s"] == pytest.approx(18 / batched["seconds"])
    assert batched["triton_compiles"] >= 0  # the CPU runs the reference kernels: no Triton
    # The per-batch-size breakdown covers every step, and its host time is the total's.
    buckets = [int(key.removeprefix("steps_rows_le")) for key in batched
               if key.startswith("steps_rows_le")]
    assert buckets and set(buckets) <= {1, 2, 4} and max(buckets) == 4  # max_num_seqs 4
    assert sum(batched[f"steps_rows_le{b}"] for b in buckets) == batched["steps"]
    assert sum(batched[f"steps_rows_le{b}"] * batched[f"cpu_ms_per_step_rows_le{b}"]
               for b in buckets) == pytest.approx(batched["steps"] * batched["cpu_ms_per_step"])
    assert "cpu_below_gpu_every_rows_bucket" not in batched  # no device timing on the CPU
    sequential = run_sequential(engine, requests)
    assert sequential["output_tokens"] == 6 * 3
    assert sequential["requests_s"] == pytest.approx(6 / sequential["seconds"])
    assert not engine.has_unfinished_requests()


def test_rows_buckets_are_the_power_of_2_at_or_above():
    from kiln.bench.throughput import rows_bucket, rows_breakdown

    assert [rows_bucket(rows) for rows in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [
        1, 1, 2, 4, 4, 8, 1024, 1024, 2048]
    timed = rows_breakdown({4: [2, 0.002, 0.010], 1024: [1, 0.030, 0.020]})
    assert timed["cpu_ms_per_step_rows_le4"] == pytest.approx(1.0)
    assert timed["gpu_ms_per_step_rows_le1024"] == pytest.approx(20.0)
    assert timed["cpu_below_gpu_every_rows_bucket"] == 0.0  # 30 ms of host over 20 of GPU
    assert "cuda_mallocs_rows_le4" not in timed  # no allocator counts (the CPU)
    # On CUDA each bucket also says how often the caching allocator called cudaMalloc and
    # how often it retried (synchronising the device: host time that is really a wait).
    counted = rows_breakdown({512: [4, 0.5, 0.5, 12, 2], 1024: [9, 0.1, 0.2, 0, 0]})
    assert (counted["cuda_mallocs_rows_le512"], counted["cuda_alloc_retries_rows_le512"]) == (12, 2)
    assert "cuda_mallocs_rows_le1024" not in counted


def test_device_time_goes_to_the_bucket_of_the_step_that_ran_it(engine, monkeypatch):
    """Under overlap scheduling a step() collects the previous step's device time: the
    breakdown charges it to that step's rows bucket (charged to the collecting step, the
    H200's ramp-up buckets read 43.6 ms of host against 0.0 of GPU). A stand-in step() runs
    one request a step: launches of 1, 2, 3 rows (buckets 1, 2, 4), each collecting its
    predecessor's device time of 10 ms × its rows, then one drain call, which launches
    nothing: its host time goes to the step it collected, and it is no step of its own."""
    from kiln.runtime.engine import EngineStats

    rows_per_call = iter([1, 2, 3, 0])
    state = {"launched": 0, "left": 4}

    def step():
        engine.stats.step_seconds += 0.001  # host time, no wait
        engine.stats.gpu_seconds += 0.010 * state["launched"]  # the previous launch's
        engine.runner.graph_steps += state["launched"] >= 2  # 2 and 3 rows: decode graphs
        state["launched"] = next(rows_per_call)
        engine.scheduler_rows = state["launched"]
        state["left"] -= 1
        return []

    monkeypatch.setattr(engine, "scheduler_rows", 0, raising=False)
    monkeypatch.setattr(engine.runner, "graph_steps", 0)
    monkeypatch.setattr(engine, "stats", EngineStats())
    monkeypatch.setattr(engine, "overlap_scheduling", True)
    monkeypatch.setattr(engine, "step", step)
    monkeypatch.setattr(engine, "has_unfinished_requests", lambda: state["left"] > 0)
    monkeypatch.setattr(engine, "add_request", lambda *args: None)
    monkeypatch.setattr(type(engine.scheduler), "num_running",
                        property(lambda scheduler: engine.scheduler_rows), raising=False)
    batched = run_batched(engine, synthetic_requests(1, 5, 3, vocab_size=64, seed=0))
    # Buckets 1, 2, 4 ran 10, 20, 30 ms; the drain call's 1 ms of host is bucket 4's.
    assert batched["steps"] == 4
    assert batched["steps_rows_le1"] == 1
    assert batched["gpu_ms_per_step_rows_le1"] == pytest.approx(10.0)
    assert batched["gpu_ms_per_step_rows_le2"] == pytest.approx(20.0)
    assert batched["gpu_ms_per_step_rows_le4"] == pytest.approx(30.0)
    assert batched["cpu_ms_per_step_rows_le4"] == pytest.approx(2.0)
    assert batched["cpu_below_gpu_every_rows_bucket"] == 1.0
    # Graph steps apart from eager ones, host and device time of the same steps.
    assert batched["graph_gpu_ms_per_step"] == pytest.approx(25.0)  # 20 and 30 ms
    assert batched["graph_cpu_ms_per_step"] == pytest.approx(1.5)  # 1 ms, and 1 + the drain's
    assert batched["eager_gpu_ms_per_step"] == pytest.approx(10.0)
    assert batched["eager_cpu_ms_per_step"] == pytest.approx(1.0)

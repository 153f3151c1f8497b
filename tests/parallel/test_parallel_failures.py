"""A tp 2 engine whose worker dies (SIGKILL mid-run) or hangs (sleeps forever) stops with one
clear error within 30 s, and no process is left behind; SIGTERM, SIGKILL or Ctrl-C of the
engine process take its workers down too.

The engine runs in a child process (tests/parallel/engine_script.py), so the test can signal
it and watch every process of the group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig
from tests.helpers import save_tiny_hf_model, tiny_llama_config

SCRIPT = Path(__file__).with_name("engine_script.py")
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def engine_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("failing-engine")
    save_tiny_hf_model(tiny_llama_config(num_attention_heads=4, num_key_value_heads=2), root / "hf")
    return root


@pytest.fixture(scope="module")
def engine_dir(engine_root) -> Path:
    build_engine(engine_root / "hf", engine_root / "tp2", BuildConfig(dtype="float32"),
                 progress=False, tp=2)
    return engine_root / "tp2"


@pytest.fixture(scope="module")
def pipeline_dir(engine_root) -> Path:
    build_engine(engine_root / "hf", engine_root / "pp2", BuildConfig(dtype="float32"),
                 progress=False, pp=2)
    return engine_root / "pp2"


class EngineProcess:
    """engine_script.py running a long generation; its worker pids once it steps."""

    def __init__(self, engine_dir: Path, *arguments: str, **environment: str) -> None:
        env = {**os.environ, **environment}
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(engine_dir), *arguments], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        assert line.startswith("WORKERS "), line + self.process.stderr.read()
        self.worker_pids = [int(pid) for pid in line.split()[1:]]
        assert self.process.stdout.readline().startswith("STEPPING")

    def wait(self) -> tuple[int, str, float]:
        """(exit code, stderr, seconds until exit)."""
        started = time.monotonic()
        try:
            _, stderr = self.process.communicate(timeout=DEADLINE_S + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.kill_workers()
            pytest.fail("the engine process did not exit")
        return self.process.returncode, stderr, time.monotonic() - started

    def kill_workers(self) -> None:
        for pid in self.worker_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # already gone: what this cleanup wants
                pass

    def assert_no_worker_left(self, within_s: float = 10.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if not any(_alive(pid) for pid in self.worker_pids):
                return
            time.sleep(0.1)
        self.kill_workers()
        pytest.fail(f"workers still running: {[p for p in self.worker_pids if _alive(p)]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a dead parent's successor) holds no memory.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_rank_1_and_check_the_error(engine: EngineProcess) -> None:
    os.kill(engine.worker_pids[0], signal.SIGKILL)
    code, stderr, seconds = engine.wait()
    assert code == 1 and seconds < DEADLINE_S, (code, seconds, stderr)
    assert f"worker rank 1 (pid {engine.worker_pids[0]}) killed by SIGKILL" in stderr, stderr
    assert "Traceback" not in stderr
    engine.assert_no_worker_left()


def test_killed_worker_stops_the_engine_with_a_clear_error(engine_dir):
    kill_rank_1_and_check_the_error(EngineProcess(engine_dir))


def test_worker_dying_before_it_joins_fails_the_start_at_once(engine_dir, monkeypatch):
    """Rank 0 polls its children while it waits for them to arrive: a worker that exits
    before joining used to leave it waiting the whole start-up timeout (10 minutes), inside
    init_process_group, with no process left to answer."""
    from kiln.parallel.executor import WorkerFailure
    from tests.helpers import make_cpu_engine

    monkeypatch.setenv("KILN_TEST_WORKER_FAULT", "1:exit@0")
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"^a parallel worker failed at start-up: worker "
                       r"rank 1 \(pid \d+\) exited with code 3$"):
        make_cpu_engine(engine_dir)
    assert time.monotonic() - started < DEADLINE_S
    monkeypatch.delenv("KILN_TEST_WORKER_FAULT")
    make_cpu_engine(engine_dir).close()  # the process can start an engine again


def test_worker_dying_after_it_joined_fails_the_start_and_leaves_no_world(engine_dir,
                                                                          monkeypatch):
    """A worker that dies once the world is up (loading its weights, sizing its cache):
    the start fails naming it, and rank 0 leaves that world, so the next engine in the
    process starts a world of its own instead of reusing one whose peer is gone."""
    import torch.distributed as dist

    from kiln.parallel.executor import WorkerFailure
    from kiln.runtime.sampling_params import SamplingParams
    from tests.helpers import make_cpu_engine, run_to_completion

    monkeypatch.setenv("KILN_TEST_WORKER_FAULT", "1:exit@joined")
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"worker rank 1 \(pid \d+\) exited with code 3"):
        make_cpu_engine(engine_dir)
    assert time.monotonic() - started < DEADLINE_S
    assert not dist.is_initialized()
    monkeypatch.delenv("KILN_TEST_WORKER_FAULT")
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    with make_cpu_engine(engine_dir) as engine:
        outputs = run_to_completion(engine, [[1, 2, 3]], [greedy])
    assert len(outputs[0].outputs[0].token_ids) == 2


def test_hung_worker_stops_the_engine_within_the_step_timeout(engine_dir):
    engine = EngineProcess(engine_dir, KILN_TEST_WORKER_FAULT="1:hang@4",
                           KILN_PARALLEL_STEP_TIMEOUT_S="5")
    code, stderr, seconds = engine.wait()
    assert code == 1 and seconds < DEADLINE_S, (code, seconds, stderr)
    assert "a rank did not answer within 5 s" in stderr, stderr
    engine.assert_no_worker_left()


def test_hung_pipeline_stage_stops_the_engine_within_the_step_timeout(pipeline_dir):
    """pp 2, two micro-batches in flight: the last stage hangs; rank 0 (stage 0) waits on
    it sending activations or receiving results, each bounded by the step timeout."""
    engine = EngineProcess(pipeline_dir, KILN_TEST_WORKER_FAULT="1:hang@6",
                           KILN_PARALLEL_STEP_TIMEOUT_S="5")
    code, stderr, seconds = engine.wait()
    assert code == 1 and seconds < DEADLINE_S, (code, seconds, stderr)
    assert "a rank did not answer within 5 s" in stderr, stderr
    assert "Traceback" not in stderr
    engine.assert_no_worker_left()


@pytest.mark.slow_parallel
def test_killed_pipeline_stage_stops_the_engine_with_a_clear_error(pipeline_dir):
    kill_rank_1_and_check_the_error(EngineProcess(pipeline_dir, "overlap"))


@pytest.mark.slow_parallel
def test_hung_worker_with_overlapped_steps_stops_the_engine(engine_dir):
    """tp 2 with overlap scheduling (step N + 1 launched before N is collected)."""
    engine = EngineProcess(engine_dir, "overlap", KILN_TEST_WORKER_FAULT="1:hang@4",
                           KILN_PARALLEL_STEP_TIMEOUT_S="5")
    code, stderr, seconds = engine.wait()
    assert code == 1 and seconds < DEADLINE_S, (code, seconds, stderr)
    assert "a rank did not answer within 5 s" in stderr, stderr
    engine.assert_no_worker_left()


@pytest.mark.parametrize("signal_number", [
    signal.SIGTERM,
    pytest.param(signal.SIGKILL, marks=pytest.mark.slow_parallel),
    pytest.param(signal.SIGINT, marks=pytest.mark.slow_parallel),
], ids=["sigterm", "sigkill", "ctrl-c"])
def test_signalled_engine_takes_its_workers_down(engine_dir, signal_number):
    engine = EngineProcess(engine_dir)
    engine.process.send_signal(signal_number)
    code, stderr, seconds = engine.wait()
    assert seconds < DEADLINE_S
    if signal_number == signal.SIGINT:  # Ctrl-C: the engine closes its workers in order
        assert code == 130 and "interrupted" in stderr, stderr
    engine.assert_no_worker_left()


def test_server_reports_not_ready_after_a_worker_dies(engine_dir):
    import httpx

    from tests.helpers import make_cpu_engine
    from tests.serve.conftest import MODEL, serving

    engine = make_cpu_engine(engine_dir)
    try:
        with serving(engine) as server, server.client() as http:
            body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}
            assert http.post("/v1/completions", json=body).status_code == 200
            assert http.get("/ready").status_code == 200
            os.kill(engine.runner.processes[0].pid, signal.SIGKILL)
            failed = http.post("/v1/completions", json={**body, "max_tokens": 50})
            assert failed.status_code >= 500
            ready = http.get("/ready")
            assert ready.status_code == 503
            assert "worker rank 1" in ready.json()["error"]["message"]
            assert isinstance(ready, httpx.Response)
    finally:
        engine.close()
    assert engine.runner.processes[0].poll() is not None

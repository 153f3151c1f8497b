"""The scheduler → runner boundary is plain data: the runner imports nothing of the
scheduler, and an engine whose every step message crosses a msgpack round trip (as it would
to a worker process) gives exactly the tokens of one that passes the objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kiln.runtime import wire
from kiln.runtime.messages import NewRequest, ScheduledRequest, SchedulerOutput
from kiln.runtime.runner_requests import RunnerRequests
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine, make_cpu_engine, run_to_completion

RUNTIME = Path(__file__).parents[2] / "kiln" / "runtime"
# The runner's side of the boundary, and what it must never import.
RUNNER_FILES = ["model_runner.py", "runner_requests.py", "input_batch.py", "sampler.py",
                "cuda_graphs.py", "memory_profile.py", "kv_tensors.py", "messages.py", "wire.py"]
SCHEDULER_MODULES = {"kiln.runtime.scheduler", "kiln.runtime.request", "kiln.runtime.kv_cache",
                     "kiln.runtime.engine", "kiln.runtime.async_engine"}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("name", RUNNER_FILES)
def test_the_runner_side_imports_nothing_of_the_scheduler(name):
    assert not imported_modules(RUNTIME / name) & SCHEDULER_MODULES


class RoundTripRunner:
    """The engine's runner behind the wire: every SchedulerOutput and ModelRunnerOutput is
    encoded to bytes and decoded before the other side sees it."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self.num_messages = 0

    def execute_async(self, scheduler_output):
        decoded = wire.decode(wire.encode(scheduler_output))
        assert decoded == scheduler_output
        self.num_messages += 1
        return self._runner.execute_async(decoded)

    def collect(self, launched):
        output = self._runner.collect(launched)
        decoded = wire.decode(wire.encode(output))
        assert decoded == output
        self.num_messages += 1
        return decoded

    def __getattr__(self, name):
        return getattr(self._runner, name)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("boundary"), vocab_size=96)


def workload():
    shared = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 1, 3]  # a prefix several prompts reuse
    prompts = [shared + [i, i + 1] for i in range(4)] + [[5] * 30, [1, 2, 3], list(range(40))]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1, max_tokens=10,
                       ignore_eos=True, logprobs=3),
        SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, min_tokens=4, max_tokens=8, stop_token_ids=[11]),
        SamplingParams(temperature=0.7, min_p=0.1, seed=3, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.5,
                       seed=4, max_tokens=7, ignore_eos=True),
    ]
    return prompts, params


def summary(outputs):
    return [
        [(c.token_ids, c.finish_reason,
          [(lp.sampled_token_id, round(lp.sampled_logprob, 5)) for lp in c.logprobs or []])
         for c in output.outputs]
        for output in outputs
    ]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_serialised_boundary_gives_identical_tokens(engine_dir, overlap):
    prompts, params = workload()
    # A small cache (and chunked prefill): preemption and prefix reuse both happen.
    knobs = dict(num_kv_blocks=30, max_num_batched_tokens=24, overlap_scheduling=overlap)
    direct = make_cpu_engine(engine_dir, **knobs)
    expected = run_to_completion(direct, prompts, params)
    engine = make_cpu_engine(engine_dir, **knobs)
    engine.runner = RoundTripRunner(engine.runner)
    outputs = run_to_completion(engine, prompts, params)
    assert summary(outputs) == summary(expected)
    assert engine.runner.num_messages >= 2 * engine.stats.num_steps
    assert sum(m.num_preemptions for o in outputs for m in o.metrics) > 0
    assert sum(o.num_cached_tokens for o in outputs) > 0
    assert len(engine.runner.requests) == 0 and len(engine.runner.generators) == 0


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([SchedulerOutput([ScheduledRequest("ghost", 0, 3)])],
         "request 'ghost' was scheduled before the runner was told of it"),
        ([SchedulerOutput([ScheduledRequest("a", 0, 3, new_block_ids=[1])],
                          new_requests=[NewRequest("a", [1, 2, 3], SamplingParams(), None)]),
          SchedulerOutput([ScheduledRequest("a", 3, 1, new_block_ids_start=4,
                                            new_block_ids=[7])])],
         "request 'a': new blocks start at 4, but the runner holds 1"),
        ([SchedulerOutput([], new_requests=[NewRequest("a", [1], SamplingParams(), None)]),
          SchedulerOutput([], new_requests=[NewRequest("a", [1], SamplingParams(), None)])],
         "request 'a' is already known to the runner"),
    ],
)
def test_a_message_that_does_not_follow_the_last_is_refused(messages, error):
    """A lost or reordered message must stop the runner with the request named, not feed
    the model wrong tokens or blocks."""
    requests = RunnerRequests()
    *earlier, last = messages
    for message in earlier:
        requests.apply(message)
    with pytest.raises(RuntimeError, match=error):
        requests.apply(last)

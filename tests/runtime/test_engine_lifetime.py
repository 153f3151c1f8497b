"""One engine or many per process: close() (or leaving a `with` block) aborts what is left,
frees the model, KV cache and buffers, and a second engine then works as the first did.
(tests/gpu/test_engine_lifetime_gpu.py checks the device memory itself.)"""

from __future__ import annotations

import gc
import weakref

import pytest

from kiln.entrypoints import LLM
from kiln.errors import KilnError
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine, make_cpu_engine, run_to_completion

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5]]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("lifetime"))


def test_close_frees_the_model_and_refuses_more_work(engine_dir):
    engine = make_cpu_engine(engine_dir, num_kv_blocks=32)
    model = weakref.ref(engine.runner.model)
    kv_cache = weakref.ref(engine.runner.kv_caches[0])
    engine.add_request("left", PROMPTS[0], GREEDY)
    engine.step()
    engine.close()
    assert engine.closed and not engine.has_unfinished_requests()
    gc.collect()
    assert model() is None and kv_cache() is None  # nothing else holds them
    with pytest.raises(KilnError, match="the engine is closed"):
        engine.step()
    with pytest.raises(KilnError, match="the engine is closed"):
        engine.add_request(None, PROMPTS[0], GREEDY)
    engine.close()  # idempotent


def test_close_with_a_step_in_flight(engine_dir):
    engine = make_cpu_engine(engine_dir, num_kv_blocks=32, overlap_scheduling=True)
    for prompt in PROMPTS:
        engine.add_request(None, prompt, GREEDY)
    engine.step()
    engine.step()
    assert engine._in_flight is not None
    manager = engine.scheduler.kv_cache_manager
    engine.close()
    assert manager.num_free_blocks == manager.num_usable_blocks


def test_engines_one_after_another_in_one_process(engine_dir):
    with make_cpu_engine(engine_dir, num_kv_blocks=32) as first:
        expected = run_to_completion(first, PROMPTS, [GREEDY] * 2)
    assert first.closed
    with make_cpu_engine(engine_dir, num_kv_blocks=32) as second:
        outputs = run_to_completion(second, PROMPTS, [GREEDY] * 2)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def test_llm_is_a_context_manager(engine_dir):
    with LLM(model=str(engine_dir), device="cpu", num_kv_blocks=32) as llm:
        [output] = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
        assert len(output.outputs[0].token_ids) == 8
    assert llm.llm_engine.closed
    llm.close()  # idempotent

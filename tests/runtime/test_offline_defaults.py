"""The offline entry point: its step sizes (larger on a GPU, EngineConfig's on the CPU, never
over what the user set) and its final-outputs-only generate."""

from __future__ import annotations

import pytest
import torch

from kiln.config import EngineConfig
from kiln.entrypoints import LLM, OFFLINE_GPU_DEFAULTS, offline_defaults
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine


def test_cpu_keeps_the_engine_config_defaults():
    assert offline_defaults({"device": "cpu"}) == {"device": "cpu"}
    config = EngineConfig(**offline_defaults({"device": "cpu"}))
    assert config.max_num_seqs == EngineConfig().max_num_seqs


def test_gpu_fills_in_the_offline_step_sizes_unless_set(monkeypatch):
    monkeypatch.setattr("kiln.runtime.engine.resolve_device", lambda name: torch.device("cuda"))
    assert offline_defaults({}) == OFFLINE_GPU_DEFAULTS
    knobs = offline_defaults({"max_num_seqs": 64, "block_size": 32})
    assert knobs == {"max_num_seqs": 64, "block_size": 32,
                     "max_num_batched_tokens": OFFLINE_GPU_DEFAULTS["max_num_batched_tokens"],
                     "max_prefill_tokens_while_decoding": None}
    # Larger than a server's: that is the point of them.
    assert OFFLINE_GPU_DEFAULTS["max_num_seqs"] > EngineConfig().max_num_seqs
    assert OFFLINE_GPU_DEFAULTS["max_num_batched_tokens"] > EngineConfig().max_num_batched_tokens
    # No prefill cap offline (nobody's tokens stream), a server's 512 otherwise; a cap the
    # user sets stays.
    assert EngineConfig(**offline_defaults({})).max_prefill_tokens_while_decoding is None
    assert EngineConfig().max_prefill_tokens_while_decoding == 512
    assert offline_defaults({"max_prefill_tokens_while_decoding": 64})[
        "max_prefill_tokens_while_decoding"] == 64


@pytest.fixture(scope="module")
def tiny_engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny-llm"))


def test_generate_returns_final_outputs_in_prompt_order(tiny_engine_dir):
    """LLM.generate asks the engine for final outputs only: one finished output per prompt,
    in prompt order, with every token; the caller's SamplingParams are left as they were."""
    llm = LLM(model=str(tiny_engine_dir), device="cpu", num_kv_blocks=64, block_size=4)
    shared = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [9]},
               {"prompt_token_ids": [1, 2, 3, 4, 5, 6]}]
    outputs = llm.generate(prompts, shared, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == [p["prompt_token_ids"] for p in prompts]
    assert all(o.finished and len(o.outputs[0].token_ids) == 5 for o in outputs)
    assert shared.output_kind == "cumulative"
    # The same greedy tokens one prompt at a time.
    alone = llm.generate(prompts[2], shared, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outputs[2].outputs[0].token_ids


@pytest.mark.parametrize("cap", [None, 7])
def test_the_prefill_cap_reaches_the_scheduler(tiny_engine_dir, cap):
    llm = LLM(model=str(tiny_engine_dir), device="cpu", num_kv_blocks=64, block_size=4,
              max_prefill_tokens_while_decoding=cap)
    assert llm.llm_engine.scheduler.config.max_prefill_tokens_while_decoding == cap


def test_a_prefill_cap_below_one_names_the_field():
    from kiln.config import validated
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=r"^invalid EngineConfig: max_prefill_tokens_while_decoding: "
                                        r".*greater than or equal to 1 \(got 0\)$"):
        validated(EngineConfig, max_prefill_tokens_while_decoding=0)


def test_generate_rejects_what_is_not_sampling_params(tiny_engine_dir):
    llm = LLM(model=str(tiny_engine_dir), device="cpu", num_kv_blocks=64, block_size=4)
    with pytest.raises(ValueError, match=r"sampling_params\[1\] is a dict, not a SamplingParams"):
        llm.generate([[1, 2], [3]], [SamplingParams(max_tokens=2), {"max_tokens": 2}],
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_large_offline_batch_is_frozen_out_of_the_collectors_sight(tiny_engine_dir,
                                                                       monkeypatch):
    """LLM.generate with OFFLINE_FREEZE_AT or more prompts freezes the heap once they are
    queued (the collector's full passes walked them all and freed nothing) and afterwards
    collects what became garbage meanwhile and restores the start-up freeze; a smaller
    batch is left alone."""
    import gc

    import kiln.runtime.engine as engine_module

    llm = LLM(model=str(tiny_engine_dir), device="cpu", num_kv_blocks=64, block_size=4)
    engine = llm.llm_engine
    monkeypatch.setattr(engine_module, "OFFLINE_FREEZE_AT", 3)
    calls = []
    for name in ("freeze", "unfreeze", "collect"):
        monkeypatch.setattr(engine_module.gc, name,
                            lambda *args, name=name: calls.append(
                                (name, engine.scheduler.has_unfinished_requests())))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([[1, 2]] * 2, params, use_tqdm=False)
    assert calls == []  # below the threshold
    outputs = llm.generate([[1, 2]] * 3, params, use_tqdm=False)
    # Frozen with the requests queued; given back, collected, and (no start-up freeze on
    # the CPU) left unfrozen once they are done.
    assert calls == [("freeze", True), ("unfreeze", False), ("collect", False)]
    assert all(len(o.outputs[0].token_ids) == 2 for o in outputs)
    calls.clear()
    engine._collector_before = gc.get_threshold()  # as from_engine_dir on CUDA
    llm.generate([[1, 2]] * 3, params, use_tqdm=False)
    assert calls[-1] == ("freeze", False)  # the start-up freeze restored
    monkeypatch.undo()
    engine.close()
    assert gc.get_freeze_count() == 0

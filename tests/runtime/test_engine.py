"""The engine loop end to end on a tiny random Llama (float32, CPU, reference kernels).

"Batching is invisible": whatever the batch, chunking and preemption, greedy tokens equal
running each prompt alone, and equal transformers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine, hf_greedy, make_cpu_engine, run_to_completion

VOCAB = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    engine_dir = build_tiny_engine(directory, hidden_size=64, intermediate_size=96,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory / "hf").eval()
    return hf_model, engine_dir


def random_prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (count,), generator=generator).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def test_batching_chunking_and_preemption_are_invisible(tiny):
    hf_model, engine_dir = tiny
    prompts = random_prompts(64, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=4 + i % 13, ignore_eos=True) for i in range(64)]

    # Small token budget (chunked prefill) and a pool of 19 usable blocks of 4 tokens for
    # 64 requests needing up to 14 blocks each: preemption is certain.
    batched_engine = make_cpu_engine(engine_dir, max_num_batched_tokens=24, num_kv_blocks=20, max_num_seqs=32)
    batched = run_to_completion(batched_engine, prompts, params)
    assert sum(m.num_preemptions for out in batched for m in out.metrics) > 0
    assert batched_engine.scheduler.kv_cache_manager.num_free_blocks == 19

    alone_engine = make_cpu_engine(engine_dir, enable_prefix_caching=False)
    for prompt, param, output in zip(prompts, params, batched):
        [single] = run_to_completion(alone_engine, [prompt], [param])
        assert output.outputs[0].token_ids == single.outputs[0].token_ids
        assert len(output.outputs[0].token_ids) == param.max_tokens
        assert output.outputs[0].finish_reason == "length"

    for prompt, param, output in zip(prompts, params, batched):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, param.max_tokens)


def test_prefix_reuse_computes_only_the_rest(tiny):
    _, engine_dir = tiny
    engine = make_cpu_engine(engine_dir)
    shared = list(range(10, 26))  # 16 tokens = 4 full blocks
    first = shared + [1, 2, 3]
    second = shared + [7, 8, 9, 10, 11]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    run_to_completion(engine, [first], [params])
    [reused] = run_to_completion(engine, [second], [params])
    assert reused.metrics[0].num_cached_prompt_tokens == 16  # 4 full blocks, ≥ 3 required

    cold = make_cpu_engine(engine_dir, enable_prefix_caching=False)
    [fresh] = run_to_completion(cold, [second], [params])
    assert fresh.metrics[0].num_cached_prompt_tokens == 0
    assert reused.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_n_samples_seeded_reproducible_and_distinct(tiny):
    _, engine_dir = tiny
    engine = make_cpu_engine(engine_dir)
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    [a] = run_to_completion(engine, [[1, 2, 3, 4, 5]], [params])
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    # Same seeded request again, now in a batch with unrelated requests around it.
    b = run_to_completion(engine, [[9, 9, 9], [1, 2, 3, 4, 5], [4, 4]], [noise, params, noise])[1]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # n samples differ from each other


def test_logprobs_and_deltas(tiny):
    _, engine_dir = tiny
    engine = make_cpu_engine(engine_dir)
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    request_id = engine.add_request(None, [5, 6, 7], params)
    deltas = []
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            deltas.extend(output.outputs[0].delta_token_ids)
            final = output
    assert final.request_id == request_id and final.finished
    completion = final.outputs[0]
    assert deltas == completion.token_ids
    assert len(completion.logprobs) == 5
    for token_id, record in zip(completion.token_ids, completion.logprobs):
        assert record.sampled_token_id == token_id
        assert record.top[0][0] == token_id  # greedy: the sampled token is the best one
        assert len(record.top) == 3


def test_final_only_requests_report_once_with_everything_cumulative_ones_have(tiny):
    """output_kind "final_only" (LLM.generate, the throughput bench) returns one output per
    request, when it finishes, equal to the last output of the same request streamed."""
    _, engine_dir = tiny
    engine = make_cpu_engine(engine_dir)
    prompts = random_prompts(6, seed=3)
    streamed = SamplingParams(temperature=0, max_tokens=7, logprobs=2, ignore_eos=True)
    final_only = dataclasses.replace(streamed, output_kind="final_only")
    reports: dict[str, list] = {}
    ids = {}
    for index, prompt in enumerate(prompts):
        params = final_only if index % 2 else streamed
        ids[engine.add_request(None, {"prompt_token_ids": prompt}, params)] = index
    while engine.has_unfinished_requests():
        for output in engine.step():
            reports.setdefault(output.request_id, []).append(output)
    for request_id, index in ids.items():
        outputs = reports[request_id]
        if index % 2:
            assert len(outputs) == 1 and outputs[0].finished
        else:
            assert len(outputs) > 1 and not outputs[0].finished
    # Same prompt, same greedy tokens and logprobs either way (run alone this time).
    by_index = {index: reports[request_id][-1] for request_id, index in ids.items()}
    again = make_cpu_engine(engine_dir)
    for index, final in by_index.items():
        (rerun,) = run_to_completion(again, [prompts[index]], [streamed if index % 2 else final_only])
        assert rerun.outputs[0].token_ids == final.outputs[0].token_ids
        # Batched with other rows, the fp32 matmuls sum in another order: ulps apart.
        for ours, theirs in zip(rerun.outputs[0].logprobs, final.outputs[0].logprobs, strict=True):
            assert ours.sampled_logprob == pytest.approx(theirs.sampled_logprob, abs=1e-4)
            assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert rerun.outputs[0].finish_reason == final.outputs[0].finish_reason


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, VOCAB], SamplingParams(), "outside the vocabulary"),
        ([1, -1], SamplingParams(), "outside the vocabulary"),
        (list(range(100)), SamplingParams(max_tokens=50), "max_model_len"),
    ],
)
def test_bad_requests_rejected_and_engine_keeps_working(tiny, prompt, params, message):
    _, engine_dir = tiny
    engine = make_cpu_engine(engine_dir)
    good = engine.add_request(None, [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    with pytest.raises(ValueError, match=message):
        engine.add_request(None, {"prompt_token_ids": prompt}, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.finished)
    assert [o.request_id for o in outputs] == [good]
    assert len(outputs[0].outputs[0].token_ids) == 3


def test_abort_frees_blocks(tiny):
    _, engine_dir = tiny
    engine = make_cpu_engine(engine_dir, num_kv_blocks=40)
    manager = engine.scheduler.kv_cache_manager
    idle = manager.num_free_blocks
    ids = [engine.add_request(None, list(range(1, 30)), SamplingParams(max_tokens=20)) for _ in range(3)]
    engine.step()
    engine.step()
    for request_id in ids:
        assert engine.abort_request(request_id)
    assert not engine.has_unfinished_requests()
    assert manager.num_free_blocks == idle
    # Idle now: the runner was told at once and holds nothing of them.
    assert len(engine.runner.requests) == 0

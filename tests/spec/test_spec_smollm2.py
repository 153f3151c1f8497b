"""Speculative decoding on the real default model (SmolLM2-135M-Instruct, CPU, float32):
greedy tokens and text identical to a run without it, with n-gram lookup and with the model
as its own draft; a stop string ends both runs at the same place; streamed text deltas of
several tokens add up to the final text."""

from __future__ import annotations

import pytest

from kiln import LLM, SamplingParams
from kiln.checkpoint.gguf import default_model_path

PASSAGE = ("The river rises in the northern hills, runs through three market towns and "
           "reaches the sea at a wide estuary where fishing boats shelter in winter.")
PROMPTS = [f"Repeat this sentence exactly: {PASSAGE}"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def plain(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("KILN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    with LLM(model=default_model_path(), dtype="float32", device="cpu") as llm:
        yield llm


def greedy(max_tokens=14, **extra):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_and_stop_strings_are_unchanged(plain, method):
    expected = plain.generate(PROMPTS, greedy(), use_tqdm=False)
    stop_word = expected[0].outputs[0].text.split()[4]  # a word of the answer
    expected_stop = plain.generate(PROMPTS[:1], greedy(stop=[stop_word]), use_tqdm=False)
    config = {"method": method, "num_speculative_tokens": 4, "adaptive": False}
    if method == "draft":
        config["model"] = str(plain.engine_dir)  # the model as its own draft
    with LLM(model=plain.engine_dir, dtype="float32", device="cpu",
             speculative_config=config) as llm:
        got = llm.generate(PROMPTS, greedy(), use_tqdm=False)
        got_stop = llm.generate(PROMPTS[:1], greedy(stop=[stop_word]), use_tqdm=False)
        stats = llm.llm_engine.speculator.stats
        if method == "draft":
            check_streamed_deltas(llm.llm_engine)
    for a, b in zip(got + got_stop, expected + expected_stop):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert got_stop[0].outputs[0].finish_reason == "stop"
    assert stats.num_accepted_tokens > 0
    if method == "draft":
        assert stats.acceptance_rate == 1.0


def check_streamed_deltas(engine):
    """Streamed text deltas of several tokens add up to the final text."""
    engine.add_request("s", PROMPTS[0], greedy(max_tokens=10))
    text, widest, final = "", 0, None
    while engine.has_unfinished_requests():
        for output in engine.step():
            text += output.outputs[0].delta_text
            widest = max(widest, len(output.outputs[0].delta_token_ids))
            final = output
    assert final.finished and text == final.outputs[0].text
    assert widest > 1

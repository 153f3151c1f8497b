"""Structured outputs in the engine: regex, choice, EBNF grammars; a complete grammar ends
the request; overlap scheduling gives the same tokens as synchronous steps; a slow compile
never stalls other requests' steps; bad constraints are refused before anything is queued."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from kiln.runtime.sampling_params import SamplingParams
from kiln.structured import StructuredOutputsParams
from kiln.structured.compiler import GrammarCompiler
from tests.helpers import make_cpu_engine, run_to_completion
from tests.structured.conftest import PADDED_IDS

PROMPT = [1, 504, 3458, 28]
ARITHMETIC = """
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]{0,2}
"""


def _params(temperature=0.0, max_tokens=48, seed=None, **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed,
                          structured_outputs=StructuredOutputsParams(**constraint))


def _texts(outputs) -> list[str]:
    return [output.outputs[0].text for output in outputs]


def test_regex_choice_and_grammar(structured_engine):
    params = [
        _params(regex=r"[a-z]{2,5}-[0-9]{1,3}"),
        _params(temperature=1.0, seed=3, regex=r"(cat|dog)s? say (meow|woof)\."),
        _params(choice=["yes", "no", "it depends"]),
        _params(temperature=1.0, seed=5, choice=["ä \"quoted\"", "back\\slash", "new\nline"]),
        _params(temperature=1.0, seed=7, grammar=ARITHMETIC),
        _params(json_object=True, temperature=1.0, seed=9, max_tokens=96),
    ]
    outputs = run_to_completion(structured_engine, [PROMPT] * len(params), params)
    texts = _texts(outputs)
    assert re.fullmatch(r"[a-z]{2,5}-[0-9]{1,3}", texts[0]), texts[0]
    assert re.fullmatch(r"(cat|dog)s? say (meow|woof)\.", texts[1]), texts[1]
    assert texts[2] in ("yes", "no", "it depends")
    assert texts[3] in ("ä \"quoted\"", "back\\slash", "new\nline")
    assert re.fullmatch(r"[0-9()+\-]+", texts[4]) and eval(texts[4]) is not None  # parses
    if outputs[5].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(texts[5]), dict)
    for output in outputs[:5]:
        assert output.outputs[0].finish_reason == "stop", output


def test_complete_grammar_ends_the_request_even_under_ignore_eos(structured_engine):
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=40, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["done"]))
    output = run_to_completion(structured_engine, [PROMPT], [params])[0].outputs[0]
    assert output.text == "done"
    assert output.finish_reason == "stop"
    # The grammar allows only EOS once complete: the last token is EOS, not more text.
    assert output.token_ids[-1] == structured_engine.eos_token_ids[0]


def test_n_sequences_each_follow_the_grammar(structured_engine):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=32,
                            structured_outputs=StructuredOutputsParams(regex=r"[A-Z][a-z]{1,4}!"))
    output = run_to_completion(structured_engine, [PROMPT], [params])[0]
    assert len(output.outputs) == 3
    for completion in output.outputs:
        assert re.fullmatch(r"[A-Z][a-z]{1,4}!", completion.text), completion.text


def test_unconstrained_rows_beside_constrained_ones_are_untouched(structured_engine):
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = run_to_completion(structured_engine, [PROMPT], [free])[0].outputs[0].token_ids
    mixed = run_to_completion(structured_engine, [PROMPT, PROMPT],
                              [free, _params(regex=r"[0-9]{3}")])
    assert mixed[0].outputs[0].token_ids == alone
    assert re.fullmatch(r"[0-9]{3}", mixed[1].outputs[0].text)


def test_overlap_scheduling_gives_the_same_tokens(structured_engine_dir):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
              "maximum": 99}, "b": {"enum": ["x", "y"]}}, "required": ["a", "b"],
              "additionalProperties": False}
    params = [_params(json=schema, temperature=t, seed=i) for i, t in enumerate([0.0, 1.0, 1.0])]
    params.append(SamplingParams(temperature=1.0, seed=4, max_tokens=10, ignore_eos=True))
    results = []
    for overlap in (False, True):
        engine = make_cpu_engine(structured_engine_dir, block_size=16, num_kv_blocks=256,
                                 overlap_scheduling=overlap)
        try:
            results.append([o.outputs[0].token_ids
                            for o in run_to_completion(engine, [PROMPT] * 4, params)])
        finally:
            engine.close()
    assert results[0] == results[1]


def test_padded_vocabulary_ids_are_masked(structured_engine):
    manager = structured_engine.structured_outputs()
    constraint = StructuredOutputsParams(json_object=True)
    manager.start("probe", manager.compiler.compile_blocking(constraint), constraint)
    try:
        bitmask = manager.token_bitmask(["other", "probe"], pin_memory=False)
    finally:
        manager.drop("probe")
    vocab = structured_engine.model_config.vocab_size
    logits = torch.zeros(2, vocab)
    from kiln.structured.bitmask import apply_token_bitmask

    apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(logits[0]).all()  # an unconstrained row allows everything
    tokenizer_vocab = vocab - PADDED_IDS
    assert torch.isinf(logits[1, tokenizer_vocab:]).all()
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(structured_engine.tokenizer.decode([t]).startswith("{")
                           for t in allowed)


def test_a_slow_compile_does_not_stall_other_requests(structured_engine, monkeypatch):
    slow_seconds = 1.5
    original = GrammarCompiler.compile

    def slow_compile(self, params):
        time.sleep(slow_seconds)
        return original(self, params)

    monkeypatch.setattr(GrammarCompiler, "compile", slow_compile)
    engine = structured_engine
    constrained = engine.add_request(None, {"prompt_token_ids": PROMPT},
                                     _params(regex=r"slow [0-9]{2}"))
    free = engine.add_request(None, {"prompt_token_ids": PROMPT},
                              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    started = time.monotonic()
    finished = {}
    longest_step = 0.0
    while engine.has_unfinished_requests():
        step_started = time.monotonic()
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = (output, time.monotonic() - started)
        longest_step = max(longest_step, time.monotonic() - step_started)
    assert finished[free][1] < slow_seconds  # done while the grammar was still compiling
    assert finished[constrained][1] >= slow_seconds
    assert re.fullmatch(r"slow [0-9]{2}", finished[constrained][0].outputs[0].text)
    assert longest_step < slow_seconds / 3


def test_abort_while_the_grammar_compiles(structured_engine, monkeypatch):
    original = GrammarCompiler.compile
    monkeypatch.setattr(GrammarCompiler, "compile",
                        lambda self, params: (time.sleep(0.5), original(self, params))[1])
    engine = structured_engine
    request_id = engine.add_request(None, {"prompt_token_ids": PROMPT},
                                    _params(regex=r"abort me [0-9]"))
    assert engine.has_unfinished_requests()
    assert engine.abort_request(request_id)
    assert not engine.has_unfinished_requests()
    engine.step()  # nothing left, nothing breaks
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("constraint, message", [
    (dict(regex="a(("), "structured_outputs.regex does not compile: Regex parsing error"),
    (dict(grammar="root ::= missing_rule"), "structured_outputs.grammar does not compile"),
    (dict(json={"type": "frobnicate"}), "structured_outputs.json does not compile"),
])
def test_bad_constraints_are_refused_before_queueing(structured_engine, constraint, message):
    engine = structured_engine
    params = _params(**constraint)
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.compile_structured_outputs(params)
    with pytest.raises(ValueError, match=re.escape(message)):  # cached failure: add refuses
        engine.add_request(None, {"prompt_token_ids": PROMPT}, params)
    assert not engine.has_unfinished_requests()
    # The engine still serves.
    good = run_to_completion(engine, [PROMPT], [_params(choice=["ok"])])[0]
    assert good.outputs[0].text == "ok"


def test_each_constraint_compiles_once(structured_engine):
    compiler = structured_engine.structured_outputs().compiler
    schema = {"type": "object", "properties": {"once": {"type": "boolean"}, "z": {"type": "null"}}}
    before = compiler.num_compiled
    # The same schema as a dict in another key order and as JSON text: one cache entry.
    reordered = {"properties": {"z": {"type": "null"}, "once": {"type": "boolean"}},
                 "type": "object"}
    for constraint in (schema, reordered, json.dumps(schema)):
        structured_engine.compile_structured_outputs(_params(json=constraint))
    assert compiler.num_compiled == before + 1


def test_speculative_engines_refuse_structured_outputs(structured_engine_dir):
    from kiln.config import EngineConfig
    from kiln.compiler.manifest import open_engine
    from kiln.runtime.engine import LLMEngine

    engine = LLMEngine(open_engine(structured_engine_dir),
                       EngineConfig(device="cpu", block_size=16, num_kv_blocks=128),
                       speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    try:
        with pytest.raises(ValueError, match="cannot be combined with speculative decoding"):
            engine.add_request(None, {"prompt_token_ids": PROMPT}, _params(choice=["a"]))
    finally:
        engine.close()


def test_llm_generate_checks_grammars_before_queueing(structured_engine_dir):
    from kiln import LLM, StructuredOutputsParams as Constraint

    with LLM(structured_engine_dir, device="cpu", block_size=16, num_kv_blocks=256) as llm:
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                  "required": ["city"], "additionalProperties": False}
        good = SamplingParams(max_tokens=48, temperature=0.0,
                              structured_outputs=Constraint(json=schema))
        bad = SamplingParams(max_tokens=8, structured_outputs=Constraint(regex="[unclosed"))
        with pytest.raises(ValueError, match="structured_outputs.regex does not compile"):
            llm.generate(["one", "two"], [good, bad], use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()  # nothing was queued
        [output] = llm.generate("Where is the Louvre? JSON:", good, use_tqdm=False)
        assert set(json.loads(output.outputs[0].text)) == {"city"}


def test_failures_after_a_deferred_compile_end_the_request_not_the_loop(structured_engine,
                                                                         monkeypatch):
    # A direct engine user adds a request whose grammar is still compiling; the compile then
    # fails (nobody compiled it first): step() reports it aborted with the reason, and goes on.
    original = GrammarCompiler.compile
    monkeypatch.setattr(GrammarCompiler, "compile",
                        lambda self, params: (time.sleep(0.3), original(self, params))[1])
    engine = structured_engine
    failing = engine.add_request(None, {"prompt_token_ids": PROMPT},
                                 _params(grammar="root ::= undefined_rule_x"))
    ok = engine.add_request(None, {"prompt_token_ids": PROMPT}, _params(choice=["fine"]))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0]
    assert finished[failing].finish_reason == "abort"
    assert "does not compile" in finished[failing].stop_reason
    assert finished[ok].text == "fine"


def test_mask_over_the_grammar_vocabulary_equals_xgrammar_over_the_padded_width(structured_engine):
    """The manager fills masks over the tokenizer's ids and zeroes the padding itself (much
    cheaper in xgrammar); the result must equal xgrammar's own mask at the logits' width."""
    import xgrammar as xgr

    from kiln.structured.bitmask import allocate_token_bitmask, apply_token_bitmask
    from kiln.structured.compiler import _num_token_ids

    manager = structured_engine.structured_outputs()
    vocab = structured_engine.model_config.vocab_size
    tokenizer = structured_engine.tokenizer
    assert manager.compiler.grammar_vocab_size == _num_token_ids(tokenizer) < vocab
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
              "required": ["name"], "additionalProperties": False}
    constraint = StructuredOutputsParams(json=schema)
    manager.start("probe", manager.compiler.compile_blocking(constraint), constraint)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab,
                                              stop_token_ids=structured_engine.eos_token_ids)
    reference = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(schema), any_whitespace=False))
    output_token_ids: list[int] = []
    try:
        for step in range(8):  # along a path of allowed tokens (a middle one each step)
            ours = manager.token_bitmask(["probe"], pin_memory=False)
            theirs = allocate_token_bitmask(1, vocab)
            reference.fill_next_token_bitmask(theirs)
            theirs &= manager.compiler.control_token_ban  # the manager's JSON control ban
            assert torch.equal(ours, theirs), f"step {step}"
            logits = torch.zeros(1, vocab)
            apply_token_bitmask(logits, ours)
            allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
            token_id = allowed[len(allowed) // 2]
            if token_id in structured_engine.eos_token_ids:
                break
            assert reference.accept_token(token_id)
            output_token_ids.append(token_id)
            manager.advance("probe", output_token_ids)
    finally:
        manager.drop("probe")

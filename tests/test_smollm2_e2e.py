"""The real default model end to end: SmolLM2-135M-Instruct GGUF → kiln engine → greedy
chat answer, token for token the same as transformers on the same GGUF file."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln import LLM, SamplingParams
from kiln.checkpoint.gguf import default_model_path

QUESTION = "What is the capital of France?"
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def llm(gguf_path, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("KILN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    # float32 so the comparison is exact arithmetic against transformers' float32 load.
    return LLM(model=gguf_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_greedy_chat_answer_matches_transformers(llm, gguf_path):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
    [output] = llm.chat([{"role": "user", "content": QUESTION}], params, use_tqdm=False)
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert output.prompt_token_ids == prompt_ids[0].tolist()
    with torch.no_grad():
        generated = model.generate(
            prompt_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=2,
            pad_token_id=2,
        )[0, prompt_ids.shape[1]:].tolist()
    # transformers keeps the EOS token it stopped on; kiln reports it in token_ids as well.
    assert output.outputs[0].token_ids == generated


def test_streamed_deltas_add_up(llm):
    engine = llm.llm_engine
    request_id = engine.add_request(
        None, "Write one sentence about bread.", SamplingParams(temperature=0, max_tokens=24)
    )
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                deltas.append(output.outputs[0].delta_text)
                final = output
    assert "".join(deltas) == final.outputs[0].text
    assert "\ufffd" not in final.outputs[0].text
    assert final.outputs[0].text.strip()


def test_interactive_chat_streams_answers(llm):
    """`kiln chat`: each line is a user turn, answers stream back, history carries over."""
    import io

    from kiln.entrypoints import interactive_chat

    stdin = io.StringIO("What is the capital of France?\nAnd of Italy?\n\n")
    stdout = io.StringIO()
    interactive_chat(llm, SamplingParams(temperature=0, max_tokens=24), stdin=stdin, stdout=stdout)
    transcript = stdout.getvalue()
    assert transcript.count("kiln> ") == 2
    assert "Paris" in transcript and "Rome" in transcript


def test_kiln_build_takes_the_smollm2_alias(gguf_path, tmp_path, monkeypatch, capsys):
    # `kiln build smollm2 -o DIR` builds the embedded GGUF, as generate/chat/serve read the
    # name; only with --random-weights is a source a preset name instead.
    import types

    import kiln.compiler.builder as builder
    from kiln.cli import main

    sources = []

    def record(source, output, config, **kwargs):
        sources.append(source)
        return types.SimpleNamespace(describe=lambda: "built")

    monkeypatch.setattr(builder, "build_engine", record)
    assert main(["build", "smollm2", "-o", str(tmp_path / "engine")]) == 0
    assert sources == [gguf_path]
    assert main(["build", "smollm2", "--random-weights", "-o", str(tmp_path / "random")]) != 0
    assert "smollm2" in capsys.readouterr().err

"""Tool calling through the official openai client, streaming and not, every tool_choice
mode, on three engines: the real SmolLM2 (with a tools template sent in the request, since
its own ignores tools), and tiny random-weight engines that speak through the real templates
and tool tokens of Llama-3.1 and Qwen2.5 (SmolLM2's real tokenizer underneath; kiln has no
Qwen2 architecture, so both are Llama-architecture models).

Random weights rarely write a call on their own, so `auto` is checked for well-formedness
(and, where a call appears, for validity); `required` and named functions are enforced by the
grammar engine, so there every answer is a call whose arguments validate against the schema,
and a stream assembles to exactly the non-streamed answer (temperature 0).
"""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer

from kiln import LLM, SamplingParams
from kiln.checkpoint.gguf import default_model_path
from kiln.serve.state import ServeSettings
from tests.helpers import make_cpu_engine, save_tiny_hf_model, tiny_llama_config
from tests.serve.conftest import API_KEY, MODEL, serving
from tests.serve.tool_templates import LLAMA31, QWEN25, SMOLLM2_TOOLS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                   "required": ["utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# Enough for any call the schemas above allow, in the longest tokenization.
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's real tokenizer, read from its GGUF once (seconds) and saved as plain files
    (loaded in a fraction of a second by each family)."""
    path = default_model_path()
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(directory)
    return directory


def _family_engine_dir(directory, tokenizer_dir, template: str, special: list[str],
                       plain: list[str], bos: str, eos: str):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    if plain:  # Qwen2.5's <tool_call> tags are added tokens that stay in the text
        tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in plain])
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.chat_template = template
    config = tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=2048,
                               bos_token_id=tokenizer.convert_tokens_to_ids(bos),
                               eos_token_id=tokenizer.convert_tokens_to_ids(eos))
    from kiln.compiler.builder import build_engine
    from kiln.config import BuildConfig

    save_tiny_hf_model(config, directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    with torch.no_grad():
        build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="float32"), progress=False)
    return directory / "engine"


def _llama31(directory, tokenizer_dir):
    return _family_engine_dir(directory, tokenizer_dir, LLAMA31, [
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
        "<|eom_id|>", "<|python_tag|>"], [], "<|begin_of_text|>", "<|eot_id|>")


def _qwen25(directory, tokenizer_dir):
    return _family_engine_dir(directory, tokenizer_dir, QWEN25, [], ["<tool_call>", "</tool_call>"],
                              "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def llama31_engine_dir(tmp_path_factory, smollm2_tokenizer_dir):
    return _llama31(tmp_path_factory.mktemp("llama31"), smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen25_engine_dir(tmp_path_factory, smollm2_tokenizer_dir):
    return _qwen25(tmp_path_factory.mktemp("qwen25"), smollm2_tokenizer_dir)


@pytest.fixture(scope="module", params=["smollm2", "llama31", "qwen25"])
def family(request):
    """(name, openai client, extra request fields, server) of a server on one engine."""
    if request.param == "smollm2":
        engine = request.getfixturevalue("llm_engine")
        extra = {"chat_template": SMOLLM2_TOOLS}
    else:
        engine_dir = request.getfixturevalue(f"{request.param}_engine_dir")
        engine = make_cpu_engine(engine_dir, block_size=16, num_kv_blocks=512, max_num_seqs=16,
                                 max_model_len=2048, max_num_batched_tokens=2048)
        extra = {}
    settings = ServeSettings(trust_request_chat_template=True)
    try:
        with serving(engine, settings=settings) as server, \
                openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
            yield request.param, client, extra, server
    finally:
        if request.param != "smollm2":
            engine.close()


def create(family, stream: bool, **kwargs):
    _, client, extra, _ = family
    kwargs = {"model": MODEL, "messages": QUESTION, "tools": TOOLS, "temperature": 0,
              "max_tokens": MAX_TOKENS, **kwargs}
    extra_body = {**extra, **kwargs.pop("extra_body", {})}
    if stream:
        return client.chat.completions.create(**kwargs, stream=True, extra_body=extra_body)
    return client.chat.completions.create(**kwargs, extra_body=extra_body)


def assemble(chunks) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) of a stream, checking OpenAI's delta
    shapes on the way: a call's first delta has id, type, name and arguments ""."""
    content, calls, finish_reason = [], {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content.append(delta.content or "")
            for call in delta.tool_calls or []:
                if call.index not in calls:
                    assert call.id and call.id.startswith("call_") and call.type == "function"
                    assert call.function.name and call.function.arguments == ""
                    assert call.index == len(calls)
                    calls[call.index] = [call.function.name, ""]
                else:
                    assert call.id is None and call.function.name is None
                    calls[call.index][1] += call.function.arguments
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
    text = "".join(content)
    return (text or None), [tuple(calls[i]) for i in sorted(calls)], finish_reason


def calls_of(message) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in message.tool_calls or []]


def check_valid(calls: list[tuple[str, str]]) -> None:
    for name, arguments in calls:
        assert name in SCHEMAS, name
        jsonschema_rs.validate(SCHEMAS[name], json.loads(arguments))


def test_required_yields_one_valid_call_streamed_equal_to_whole(family):
    whole = create(family, False, tool_choice="required", parallel_tool_calls=False)
    choice = whole.choices[0]
    calls = calls_of(choice.message)
    assert len(calls) == 1, choice.message
    check_valid(calls)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    if family[0] == "smollm2":
        # A real model that read the tools in its prompt picks the right one and the city.
        assert calls[0][0] == "get_weather" and json.loads(calls[0][1])["city"] == "Paris"
    streamed = assemble(create(family, True, tool_choice="required", parallel_tool_calls=False))
    assert streamed == (None, calls, "tool_calls")


def test_required_with_parallel_calls(family):
    whole = create(family, False, tool_choice="required").choices[0]
    streamed = assemble(create(family, True, tool_choice="required"))
    if whole.finish_reason == "length":
        # Random weights may go on adding calls until max_tokens: the cut-off array is not a
        # call (its text comes back as content), and the stream said "length" too.
        assert family[0] != "smollm2"
        assert whole.message.tool_calls is None and whole.message.content.startswith("[{")
        assert streamed[2] == "length"
        return
    calls = calls_of(whole.message)
    assert calls and whole.finish_reason == "tool_calls"
    check_valid(calls)
    assert streamed == (None, calls, "tool_calls")


def test_named_function_is_called_with_valid_arguments(family):
    choice = {"type": "function", "function": {"name": "get_time"}}
    whole = create(family, False, tool_choice=choice).choices[0]
    calls = calls_of(whole.message)
    assert [name for name, _ in calls] == ["get_time"]
    check_valid(calls)
    assert whole.finish_reason == "tool_calls"
    assert assemble(create(family, True, tool_choice=choice)) == (None, calls, "tool_calls")


def test_auto_answers_content_or_valid_calls_and_streams_the_same(family):
    whole = create(family, False, tool_choice="auto", max_tokens=24).choices[0]
    calls = calls_of(whole.message)
    if calls:
        check_valid(calls)  # a model that does call must call a known function
    else:
        assert whole.message.content is not None and whole.finish_reason in ("stop", "length")
    streamed = assemble(create(family, True, tool_choice="auto", max_tokens=24))
    assert streamed == (whole.message.content, calls, whole.finish_reason)


def test_none_never_parses_calls(family):
    whole = create(family, False, tool_choice="none", max_tokens=12).choices[0]
    assert whole.message.tool_calls is None and whole.message.content is not None
    assert whole.finish_reason in ("stop", "length")


def test_tool_results_are_accepted_back(family):
    first = create(family, False, tool_choice="required", parallel_tool_calls=False).choices[0]
    [call] = first.message.tool_calls
    messages = [*QUESTION,
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": call.id, "type": "function",
                                 "function": {"name": call.function.name,
                                              "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "15 degrees, sunny"}]
    answer = create(family, False, messages=messages, tool_choice="none", max_tokens=8).choices[0]
    assert answer.message.content is not None and answer.message.tool_calls is None


BAD_REQUESTS = [
    ({"tool_choice": {"type": "function", "function": {"name": "launch"}}},
     "tool_choice names function 'launch', which is not in tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice requires tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "parameters must be a JSON schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                         "required": "x"}}}]},
     "parameters.required must be a list"),
    ({"tools": [WEATHER, WEATHER]}, "tools defines 'get_weather' more than once"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
     "tools: List should have at most 128 items"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}", "description": "x" * 8000}}
                for i in range(40)]}, "the limit is 262144"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "deep", "parameters": json.loads(
        '{"type": "object", "properties": {"a": ' * 20 + '{}' + '}}' * 20)}}]},
     "nested deeper than"),
    ({"messages": [*QUESTION, {"role": "tool", "content": "15"}]}, "needs tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "tool_calls is only allowed on assistant messages"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with response_format"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(unclosed"}}}}}]},
     "the tools' schemas cannot be enforced"),
]


# The checks do not depend on the engine: one family is enough.
@pytest.mark.parametrize("family", ["llama31"], indirect=True)
@pytest.mark.parametrize("fields, message", BAD_REQUESTS)
def test_bad_tool_requests_are_400_and_the_server_stays_healthy(family, fields, message):
    server = family[3]
    body = {"model": MODEL, "messages": QUESTION, "tools": TOOLS, "max_tokens": 4, **fields}
    with server.client() as http:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]["message"]
        assert http.get("/health").json() == {"status": "ok"}
        ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION,
                                                     "max_tokens": 2})
        assert ok.status_code == 200


# SmolLM2's own template is the one that ignores tools.
@pytest.mark.parametrize("family", ["smollm2"], indirect=True)
def test_template_without_tools_and_unknown_format_are_400(family):
    server = family[3]
    with server.client() as http:
        body = {"model": MODEL, "messages": QUESTION, "tools": TOOLS, "max_tokens": 4}
        response = http.post("/v1/chat/completions", json=body)  # SmolLM2's own template
        assert response.status_code == 400
        assert "chat template does not use tools" in response.json()["error"]["message"]
        plain = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tools | length }}"
        response = http.post("/v1/chat/completions", json={**body, "chat_template": plain})
        assert response.status_code == 400
        assert "--tool-call-parser" in response.json()["error"]["message"]
        # The same template works once the output is constrained instead of parsed.
        response = http.post("/v1/chat/completions", json={
            **body, "chat_template": plain, "tool_choice": "required", "max_tokens": MAX_TOKENS,
            "temperature": 0})
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["tool_calls"]
        assert http.get("/health").status_code == 200


def test_python_api_chat_takes_tools(llama31_engine_dir):
    with LLM(model=str(llama31_engine_dir), device="cpu", num_kv_blocks=64, block_size=16) as llm:
        with_tools = llm.apply_chat_template(QUESTION, tools=TOOLS)
        assert "Environment: ipython" in with_tools and '"name": "get_weather"' in with_tools
        assert "get_weather" not in llm.apply_chat_template(QUESTION)
        [output] = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False,
                            tools=TOOLS)
        assert output.prompt_token_ids == llm.chat_token_ids(QUESTION, TOOLS)

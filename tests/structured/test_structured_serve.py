"""Structured outputs through the OpenAI-compatible server, with the `openai` client:
response_format json_object / json_schema (and `chat.completions.parse` with a pydantic
model), vLLM's structured_outputs (regex, choice, grammar) on both endpoints, streaming, and
bad constraints answered 400 with the server healthy afterwards."""

from __future__ import annotations

import json
import re

import openai
import pytest
from pydantic import BaseModel, Field

from kiln.structured.params import MAX_CONSTRAINT_CHARS, MAX_SCHEMA_DEPTH
from tests.serve.conftest import API_KEY, MODEL, serving

MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def client(structured_engine):
    with serving(structured_engine) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                            timeout=60)


class Pet(BaseModel):
    name: str = Field(max_length=8)
    species: str = Field(pattern="^(cat|dog|owl)$")
    age: int = Field(ge=0, le=30)
    vaccinated: bool


def test_chat_parse_with_a_pydantic_model_round_trips(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=96, temperature=0.7,
        seed=3)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Pet)
    assert Pet.model_validate_json(message.content) == message.parsed


def test_json_object_on_chat_and_completions(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=128,
                                          response_format={"type": "json_object"}, seed=1)
    completion = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=128, seed=2,
                                           extra_body={"response_format": {"type": "json_object"}})
    for choice_text, reason in ((chat.choices[0].message.content, chat.choices[0].finish_reason),
                                (completion.choices[0].text, completion.choices[0].finish_reason)):
        if reason == "stop":  # an object's strings may run to max_tokens on a noise model
            assert isinstance(json.loads(choice_text), dict)
        else:
            assert choice_text.startswith("{")


def test_json_schema_strict_on_completions(client):
    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
              "maximum": 9}, "tag": {"enum": ["a", "b"]}}, "required": ["id", "tag"],
              "additionalProperties": False}
    completion = client.completions.create(
        model=MODEL, prompt="Data:", max_tokens=40, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "row", "schema": schema, "strict": True}}})
    value = json.loads(completion.choices[0].text)
    assert set(value) == {"id", "tag"} and 1 <= value["id"] <= 9 and value["tag"] in "ab"


@pytest.mark.parametrize("chat", [False, True])
def test_vllm_structured_outputs_fields(client, chat):
    constraints = [
        ({"regex": r"[a-z]{3}-[0-9]{2}"}, lambda text: re.fullmatch(r"[a-z]{3}-[0-9]{2}", text)),
        ({"choice": ["left", "right"]}, lambda text: text in ("left", "right")),
        ({"grammar": 'root ::= "<" [a-c]+ ">"'}, lambda text: re.fullmatch(r"<[a-c]+>", text)),
        ({"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
         lambda text: all(isinstance(v, bool) for v in json.loads(text))),
    ]
    for constraint, check in constraints:
        extra = {"structured_outputs": constraint}
        if chat:
            response = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                      max_tokens=48, extra_body=extra, seed=4)
            text = response.choices[0].message.content
        else:
            response = client.completions.create(model=MODEL, prompt="Go:", max_tokens=48,
                                                 extra_body=extra, seed=4)
            text = response.choices[0].text
        assert response.choices[0].finish_reason == "stop", (constraint, text)
        assert check(text), (constraint, text)


def test_streaming_follows_the_grammar(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=48, stream=True, seed=6,
        extra_body={"structured_outputs": {"regex": r"(ab|cd){2,4}\."}})
    text, reasons = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
    assert re.fullmatch(r"(ab|cd){2,4}\.", text), text
    assert reasons[-1] == "stop"


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


BAD_REQUESTS = [
    ({"structured_outputs": {"regex": "a(("}}, "structured_outputs.regex does not compile"),
    ({"structured_outputs": {"grammar": "root ::= nothing_here"}},
     "structured_outputs.grammar does not compile"),
    ({"structured_outputs": {"json": {"type": "frobnicate"}}},
     "structured_outputs.json does not compile"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
    ({"structured_outputs": {}}, "exactly one of"),
    ({"structured_outputs": {"json": _nested(MAX_SCHEMA_DEPTH + 5)}},
     f"the cap is {MAX_SCHEMA_DEPTH}"),
    ({"structured_outputs": {"json": {"enum": ["x" * 1000] * 80}}},
     f"the cap is {MAX_CONSTRAINT_CHARS}"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "strict": True, "schema": {"not": {"type": "string"}}}}},
     "cannot enforce: not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
     "schema is required"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "not both"),
    ({"structured_outputs": {"choice": ["a"]}, "min_tokens": 2},
     "min_tokens cannot be combined"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS)
def test_bad_constraints_get_400_and_the_server_stays_healthy(client, body, message):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="x", max_tokens=8, extra_body=body)
    assert message in raised.value.message, raised.value.message
    ok = client.completions.create(model=MODEL, prompt="x", max_tokens=8,
                                   extra_body={"structured_outputs": {"choice": ["fine"]}})
    assert ok.choices[0].text == "fine"

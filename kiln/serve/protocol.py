"""Request bodies of the OpenAI-compatible API, validated at the edge.

Every count, list and string a client sends has a bound here, so /openapi.json tells clients
(and the fuzzer) the limits, and nothing unbounded reaches the engine. Models are strict
(`true` is not 1, "3" is not 3) and reject NaN/inf. Unknown fields are ignored, as OpenAI
clients send fields this server does not use (`user`, `metadata`, ...).

Responses are plain dicts built in `responses.py`: they follow OpenAI's shapes field for
field, and a second set of pydantic models would only be a second place to keep in step.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kiln.runtime.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MIN_SEED,
)
from kiln.structured.params import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_CONSTRAINT_CHARS

# Upper bounds that only keep requests finite; the server's own (smaller, configurable)
# caps in ServeSettings are checked by the handlers.
MAX_TOKENS_LIMIT = 1 << 20
MAX_PROMPT_IDS = 1 << 20
MAX_BATCH_PROMPTS = 256
MAX_MESSAGES = 4096
MAX_NAME_CHARS = 256
MAX_TEMPLATE_CHARS = 64 * 1024
# Tools: OpenAI's own cap on their number; the rest bound what reaches the template and the
# grammar engine (the sizes of the whole list and its nesting are checked in tools.py).
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION_CHARS = 8 * 1024
MAX_TOOL_ARGUMENTS_CHARS = 1 << 20
TOKEN_ID = Annotated[int, Field(ge=0, le=(1 << 31) - 1)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
ShortString = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]


def _nul_field(value: object, path: str) -> str | None:
    """The path of the first string holding U+0000 in `value`, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], int):
            return None  # token ids: nothing to look at
        for index, item in enumerate(value):
            found = _nul_field(item, f"{path}.{index}")
            if found:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nul_field(key, f"{path} key") or _nul_field(item, f"{path}.{key}")
            if found:
                return found
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="after")
    def _no_nul_characters(self):
        # U+0000 is valid JSON but no honest field has one, and C code downstream (logs,
        # tokenizer normalisers, templates) may cut the string at it: refused in every
        # string field, not only the prompt.
        for name in type(self).model_fields:
            found = _nul_field(getattr(self, name), name)
            if found:
                raise ValueError(f"{found} contains a NUL character (U+0000)")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


ConstraintText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]


class JsonSchemaFormat(_Strict):
    """OpenAI's response_format.json_schema. The schema's size and depth are checked when
    it becomes a StructuredOutputsParams (kiln/structured/params.py)."""

    model_config = ConfigDict(populate_by_name=True)
    name: ShortString
    description: Annotated[str, StringConstraints(max_length=MAX_CONSTRAINT_CHARS)] | None = None
    # `schema` would shadow a BaseModel attribute: aliased.
    json_schema: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs`: exactly one constraint (checked when it becomes a
    StructuredOutputsParams)."""

    model_config = ConfigDict(populate_by_name=True)
    json_: dict | ConstraintText | None = Field(None, alias="json")
    json_object: bool = False
    regex: ConstraintText | None = None
    choice: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHOICE_CHARS)]],
                      Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: ConstraintText | None = None


class SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's)."""

    model: ShortString | None = Field(None, description="the served model name; optional")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                                description="not supported: must be empty")
    user: ShortString | None = None
    # vLLM extensions.
    top_k: int | None = Field(None, ge=-1, le=1 << 20)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    ignore_eos: bool = False
    stop_token_ids: list[TOKEN_ID] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # kiln extension: put the generated token ids in every choice (and stream chunk), so a
    # client can check tokens, not only text.
    return_token_ids: bool = False
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs (not both).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, StringConstraints(max_length=1 << 24)]
        | Annotated[list[TOKEN_ID], Field(max_length=MAX_PROMPT_IDS)]
        | Annotated[list[Annotated[str, StringConstraints(max_length=1 << 24)]],
                    Field(max_length=MAX_BATCH_PROMPTS)]
        | Annotated[list[Annotated[list[TOKEN_ID], Field(max_length=MAX_PROMPT_IDS)]],
                    Field(max_length=MAX_BATCH_PROMPTS)]
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="not supported: must be false")
    suffix: ShortString | None = Field(None, description="not supported: must be empty")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="must equal n if given")


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=1 << 24)]


class ToolCallFunction(_Strict):
    name: ShortString
    arguments: Annotated[str, StringConstraints(max_length=MAX_TOOL_ARGUMENTS_CHARS)]


class AssistantToolCall(_Strict):
    """A call the assistant made earlier in the conversation, sent back by the client."""

    id: ShortString
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        Annotated[str, StringConstraints(max_length=1 << 24)]
        | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]
        | None
    ) = None
    name: ShortString | None = None
    # An assistant message's calls (its content then usually null), and the id of the call
    # a tool message answers.
    tool_calls: list[AssistantToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: ShortString | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed on assistant messages, not {self.role}")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        return self


class FunctionDefinition(_Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = Field(
        description="1-64 letters, digits, '_', '.' or '-'")
    description: Annotated[str, StringConstraints(max_length=MAX_TOOL_DESCRIPTION_CHARS)] | None = None
    parameters: dict | None = Field(None, description="a JSON schema of an object")
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: ShortString


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    # None: "auto" when there are tools, "none" otherwise (OpenAI's default).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    # Only honoured when the server runs with --trust-request-chat-template.
    chat_template: Annotated[str, StringConstraints(max_length=MAX_TEMPLATE_CHARS)] | None = None


class TokenizeRequest(_Strict):
    model: ShortString | None = None
    prompt: Annotated[str, StringConstraints(max_length=1 << 24)] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: ShortString | None = None
    tokens: list[TOKEN_ID] = Field(max_length=MAX_PROMPT_IDS)


def _template_arguments(arguments: str) -> dict | str:
    # Hugging Face templates render a call's arguments with `tojson` and expect a mapping
    # (Llama 3.1's writes `"parameters": ` + arguments|tojson); OpenAI sends a JSON string.
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them: content a plain string, a call's arguments a
    mapping."""
    result = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        entry: dict = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls is not None:
            entry["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name,
                              "arguments": _template_arguments(call.function.arguments)}}
                for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result

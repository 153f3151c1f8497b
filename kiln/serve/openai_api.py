"""The OpenAI routes: /v1/completions, /v1/chat/completions, /v1/models, plus vLLM's
/tokenize and /detokenize.

Each generation handler: check the model and readiness, turn the body into prompt token ids
and SamplingParams (400 with the numbers on anything wrong), take places in the bounded
queue (503 when full), then stream (SSE) or wait for the whole answer, in both cases
aborting the engine requests if the client leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import AsyncIterator, Callable

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kiln.checkpoint.tokenizer import chat_template_of, special_tokens_of
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from kiln.structured.params import StructuredOutputsParams
from kiln.checkpoint.chat_template import TemplateError, render_chat
from kiln.serve.errors import APIError, error_body
from kiln.serve.generation import (
    Submission, check_token_ids, compile_structured_outputs, encode, resolve_max_tokens,
    sampling_params, stream_outputs,
)
from kiln.serve.protocol import (
    ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, TokenizeRequest,
    message_dicts,
)
from kiln.serve.responses import StreamFormatter, TokenText, full_response
from kiln.serve.state import ServerState
from kiln.serve.streaming import DONE_EVENT, ClientDisconnected, SSEResponse, sse, until_disconnected
from kiln.serve.tokenization import check_prompt_chars
from kiln.serve.tool_parsers.request import NO_TOOLS, ToolPlan, plan_tools

logger = logging.getLogger("kiln.serve")
router = APIRouter()


def server_state(request: Request) -> ServerState:
    return request.app.state.kiln


def _prompt_list(body: CompletionRequest, max_prompts: int) -> list[str | list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) or not prompt:
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > max_prompts:
        raise APIError(400, f"at most {max_prompts} prompts per request, got {len(prompts)}", param="prompt")
    return prompts


async def _completion_prompts(state: ServerState, engine: LLMEngine,
                              prompts: list[str | list[int]]) -> list[list[int]]:
    token_lists = []
    for item in prompts:
        if isinstance(item, str):
            item = await encode(state, engine, item, add_special_tokens=True)
        check_token_ids(engine, list(item))
        token_lists.append(list(item))
    return token_lists


def _chat_template(state: ServerState, engine: LLMEngine, request_template: str | None) -> str:
    if engine.tokenizer is None:
        raise APIError(400, "this engine has no tokenizer, so it has no chat template")
    if request_template is not None:
        if not state.settings.trust_request_chat_template:
            raise APIError(400, "chat_template in the request is disabled on this server "
                           "(start it with --trust-request-chat-template)", param="chat_template")
        return request_template
    template = chat_template_of(engine.tokenizer, engine.engine_info.tokenizer_dir)
    if template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions")
    return template


def _conversation_chars(conversation: list[dict], tools: list[dict] | None) -> int:
    chars = sum(len(m["content"]) for m in conversation)
    for message in conversation:
        for call in message.get("tool_calls", ()):
            arguments = call["function"]["arguments"]
            chars += len(arguments if isinstance(arguments, str) else json.dumps(arguments))
    return chars + (len(json.dumps(tools)) if tools else 0)


async def _chat_prompt(state: ServerState, engine: LLMEngine, messages: list[ChatMessage],
                       add_generation_prompt: bool, template: str,
                       tools: list[dict] | None = None) -> list[int]:
    conversation = message_dicts(messages)
    # The rendered prompt holds every message's text (and the tools): too much of it is
    # refused before the template runs, as a long prompt is before the tokenizer does.
    conversation_chars = _conversation_chars(conversation, tools)
    check_prompt_chars(conversation_chars, state.max_prompt_chars(), "the conversation")
    settings = state.settings
    try:
        text = await state.tokenizer_pool.run(
            conversation_chars, render_chat, template, conversation,
            special_tokens=special_tokens_of(engine.tokenizer), add_generation_prompt=add_generation_prompt,
            tools=tools, time_budget_s=settings.chat_template_timeout_s,
            max_chars=settings.chat_template_max_chars,
        )
    except TemplateError as error:
        raise APIError(400, str(error), param="chat_template") from None
    token_ids = await encode(state, engine, text, add_special_tokens=False, what="the rendered chat")
    check_token_ids(engine, token_ids, "rendered chat")
    return token_ids


async def _with_tool_constraints(engine: LLMEngine, params: SamplingParams,
                                 plan: ToolPlan) -> SamplingParams:
    """The request's SamplingParams as its tools need them: special tokens kept for a parser
    whose marker is one, and the output held to the plan's JSON schema by the grammar engine
    (tool_choice required or a named function), compiled here, off the step loop, so a
    schema that does not compile is a 400 naming the problem."""
    changes: dict = {}
    if plan.keep_special_tokens:
        changes["skip_special_tokens"] = False
    if plan.schema is not None:
        if params.structured_outputs is not None:
            raise APIError(400, "tool_choice \"required\" or a named function cannot be combined "
                           "with response_format or structured_outputs", param="tool_choice")
        changes["structured_outputs"] = StructuredOutputsParams(json=plan.schema)
    if not changes:
        return params
    try:
        params = dataclasses.replace(params, **changes)
        await asyncio.to_thread(engine.compile_structured_outputs, params)
    except ValueError as error:  # the schema is too big or failed to compile
        raise APIError(400, f"the tools' schemas cannot be enforced: {error}", param="tools") from None
    return params


def _admit(state: ServerState, num_prompts: int, n: int) -> Callable[[], None]:
    """Places in the bounded queue, taken before any tokenizer or template work: a request
    the server has no room for costs nothing."""
    if n > state.settings.max_n:
        raise APIError(400, f"n must be <= {state.settings.max_n} on this server, got {n}", param="n")
    return state.admit(num_prompts * n)


async def _generate(request: Request, state: ServerState, body, chat: bool,
                    prompts: list[list[int]], max_tokens_requested: int | None,
                    default_max_tokens: int | None, logprobs: int | None,
                    release: Callable[[], None], tool_plan: ToolPlan = NO_TOOLS) -> Response:
    """Answer with the engine's output; `release` (the request's admission) is given back
    when the answer is complete, the client left, or this raises."""
    async_engine = state.require_ready()
    engine = async_engine.llm_engine
    max_tokens = resolve_max_tokens(state, max_tokens_requested, default_max_tokens, [len(p) for p in prompts])
    params = sampling_params(body, state, max_tokens, logprobs)
    if tool_plan.schema is None:  # otherwise the tools' schema is the constraint
        await compile_structured_outputs(engine, params, body)
    params = await _with_tool_constraints(engine, params, tool_plan)
    submission = Submission.new("chatcmpl" if chat else "cmpl", prompts, params)
    token_text = TokenText(engine.tokenizer)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        formatter = StreamFormatter(chat, submission.id_prefix, state.model_name, params.n, token_text,
                                    logprobs is not None, body.return_token_ids, include_usage,
                                    tool_plan=tool_plan)
        events = _events(state, async_engine, submission, formatter)
        return SSEResponse(events, release)
    try:
        finals = {}

        async def collect() -> None:
            async for index, output in stream_outputs(state, async_engine, submission):
                if output.finished:
                    finals[index] = output

        await until_disconnected(request, collect())
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the requests are aborted
    finally:
        release()
    return JSONResponse(full_response(chat, submission.id_prefix, state.model_name, params.n, finals,
                                      token_text, logprobs is not None, body.return_token_ids,
                                      tool_plan))


async def _events(state: ServerState, async_engine, submission: Submission,
                  formatter: StreamFormatter) -> AsyncIterator[str]:
    try:
        if formatter.chat:
            yield sse(formatter.role_chunk(len(submission.prompts) * formatter.n))
        async for index, output in stream_outputs(state, async_engine, submission):
            for chunk in formatter.step_chunks(index, output):
                yield sse(chunk)
        if formatter.include_usage:
            yield sse(formatter.usage_chunk(sum(len(p) for p in submission.prompts)))
    except APIError as error:
        # Headers are gone: the error travels as an event, then the stream ends as usual.
        yield sse(error_body(error.status, error.message, error.param, error.code))
    except Exception:
        logger.exception("error while streaming")
        yield sse(error_body(500, "internal server error"))
    yield DONE_EVENT


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = server_state(request)
    state.check_model(body.model)
    engine = state.require_ready().llm_engine
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n (beam search is not supported)", param="best_of")
    prompt_list = _prompt_list(body, state.settings.max_prompts)
    release = _admit(state, len(prompt_list), body.n)
    try:
        prompts = await _completion_prompts(state, engine, prompt_list)
        return await _generate(request, state, body, False, prompts, body.max_tokens, 16,
                               body.logprobs, release)
    except BaseException:
        release()
        raise


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    state.check_model(body.model)
    engine = state.require_ready().llm_engine
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree", param="max_tokens")
    template = _chat_template(state, engine, body.chat_template)
    tool_plan = plan_tools(body, template, state.settings.tool_call_parser)
    release = _admit(state, 1, body.n)
    try:
        prompt = await _chat_prompt(state, engine, body.messages, body.add_generation_prompt,
                                    template, tool_plan.template_tools)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _generate(request, state, body, True, [prompt], max_tokens, None, logprobs,
                               release, tool_plan)
    except BaseException:
        release()
        raise


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = server_state(request)
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kiln"}
    if state.async_engine is not None:
        engine = state.engine
        card["max_model_len"] = engine.max_model_len
        # kiln extension: where the figures of `kiln bench serve` come from.
        card["device"] = (torch.cuda.get_device_name(engine.device)
                          if engine.device.type == "cuda" else "cpu")
    return {"object": "list", "data": [card]}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    state.check_model(body.model)
    engine = state.require_ready().llm_engine
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    release = _admit(state, 1, 1)
    try:
        if body.messages is not None:
            tokens = await _chat_prompt(state, engine, body.messages, body.add_generation_prompt,
                                        _chat_template(state, engine, None))
        else:
            tokens = await encode(state, engine, body.prompt, body.add_special_tokens)
    finally:
        release()
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    state.check_model(body.model)
    engine = state.require_ready().llm_engine
    if engine.tokenizer is None:
        raise APIError(400, "this engine has no tokenizer")
    vocab = engine.model_config.vocab_size
    for token_id in body.tokens:
        if token_id >= vocab:
            raise APIError(400, f"token id {token_id} is outside the vocabulary [0, {vocab})", param="tokens")
    text = await state.tokenizer_pool.run(len(body.tokens), engine.tokenizer.decode, body.tokens)
    return {"prompt": text}

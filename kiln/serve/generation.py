"""From a validated request body to engine requests: prompts, SamplingParams, length checks,
and the merged stream of RequestOutputs of a request's prompts.

Everything that can be checked before the engine sees a request is checked here, with the
numbers in the message, so a bad request costs no engine step and never reaches the loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.request_output import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.serve.errors import APIError
from kiln.serve.protocol import SamplingFields
from kiln.serve.state import ServerState
from kiln.serve.tokenization import check_prompt_chars
from kiln.structured.compiler import unenforced_keywords
from kiln.structured.params import StructuredOutputsParams

def _encode(engine: LLMEngine, text: str, add_special_tokens: bool) -> list[int]:
    return list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))


async def encode(state: ServerState, engine: LLMEngine, text: str, add_special_tokens: bool,
                 what: str = "prompt") -> list[int]:
    """Token ids of `text`: its length checked first, then tokenized on the server's bounded
    tokenizer thread (tokenization.py), never on the engine loop's."""
    if engine.tokenizer is None:
        raise APIError(400, "this engine has no tokenizer: send token ids instead of text")
    check_prompt_chars(len(text), state.max_prompt_chars(), what)
    return await state.tokenizer_pool.run(len(text), _encode, engine, text, add_special_tokens)


def check_token_ids(engine: LLMEngine, token_ids: list[int], what: str = "prompt") -> None:
    if not token_ids:
        raise APIError(400, f"{what} is empty: at least one token is needed", param="prompt")
    vocab = engine.model_config.vocab_size
    for token_id in token_ids:
        if not 0 <= token_id < vocab:
            raise APIError(400, f"{what} token id {token_id} is outside the vocabulary "
                           f"[0, {vocab})", param="prompt")


def resolve_max_tokens(state: ServerState, requested: int | None, default: int | None,
                       prompt_lens: list[int]) -> int:
    """The max_tokens every prompt of the request gets, or 400 with the numbers."""
    engine = state.engine
    max_model_len = engine.max_model_len
    cap = state.settings.max_tokens_cap or max_model_len
    longest = max(prompt_lens)
    if requested is not None and state.settings.max_tokens_cap is not None and requested > cap:
        raise APIError(400, f"max_tokens {requested} is over this server's limit {cap}",
                       param="max_tokens")
    if longest >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, "
                       f"but the prompt has {longest} tokens, leaving no room to generate",
                       param="prompt", code="context_length_exceeded")
    max_tokens = requested if requested is not None else min(default or cap, cap, max_model_len - longest)
    if longest + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. "
                       f"However, you requested {longest + max_tokens} tokens ({longest} in the "
                       f"prompt, {max_tokens} for the completion). Reduce the prompt or "
                       f"max_tokens.", param="max_tokens", code="context_length_exceeded")
    manager = engine.scheduler.kv_cache_manager
    blocks_needed = manager.num_blocks_for(longest + max_tokens - 1)
    if blocks_needed > manager.num_usable_blocks:
        raise APIError(400, f"{longest} prompt tokens + max_tokens {max_tokens} need "
                       f"{blocks_needed} KV cache blocks of {manager.block_size} tokens, but the "
                       f"whole cache has {manager.num_usable_blocks}", param="max_tokens")
    return max_tokens


def sampling_params(body: SamplingFields, state: ServerState, max_tokens: int,
                    logprobs: int | None) -> SamplingParams:
    settings = state.settings
    if body.n > settings.max_n:
        raise APIError(400, f"n must be <= {settings.max_n} on this server, got {body.n}", param="n")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens {body.min_tokens} is over max_tokens {max_tokens}",
                       param="min_tokens")
    knobs = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
    }
    structured, _ = structured_outputs_of(body)
    try:
        return SamplingParams(
            structured_outputs=structured,
            n=body.n, max_tokens=max_tokens, seed=body.seed, stop=body.stop,
            stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens, logprobs=logprobs,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            **{name: value for name, value in knobs.items() if value is not None},
        )
    except ValueError as error:
        raise APIError(400, str(error)) from None


def structured_outputs_of(body: SamplingFields) -> tuple[StructuredOutputsParams | None, str]:
    """The request's output constraint (OpenAI's response_format or vLLM's
    structured_outputs) and the name of the field it came from; 400 naming the problem."""
    response_format = body.response_format
    fmt = response_format.type if response_format is not None else "text"
    if fmt != "text" and body.structured_outputs is not None:
        raise APIError(400, "give response_format or structured_outputs, not both",
                       param="structured_outputs")
    try:
        if fmt == "json_object":
            return StructuredOutputsParams(json_object=True), "response_format"
        if fmt == "json_schema":
            json_schema = response_format.json_schema
            if json_schema is None or json_schema.json_schema is None:
                raise APIError(400, "response_format.json_schema.schema is required for type "
                               "json_schema", param="response_format")
            if json_schema.strict:
                unenforced = unenforced_keywords(json_schema.json_schema)
                if unenforced:
                    raise APIError(400, "response_format.json_schema is strict but its schema "
                                   f"uses keywords this server cannot enforce: "
                                   f"{', '.join(unenforced)}", param="response_format")
            return StructuredOutputsParams(json=json_schema.json_schema), "response_format"
        field = body.structured_outputs
        if field is None:
            return None, ""
        return StructuredOutputsParams(json=field.json_, json_object=field.json_object,
                                       regex=field.regex, choice=field.choice,
                                       grammar=field.grammar), "structured_outputs"
    except ValueError as error:
        param = "response_format" if fmt != "text" else "structured_outputs"
        raise APIError(400, str(error), param=param) from None


async def compile_structured_outputs(engine: LLMEngine, params: SamplingParams,
                                     body: SamplingFields) -> None:
    """Compile the request's grammar (cached) before it is queued, on a thread, never on
    the event loop or the engine's step loop: one that does not compile is a 400 here."""
    if params.structured_outputs is None:
        return
    try:
        await asyncio.to_thread(engine.compile_structured_outputs, params)
    except ValueError as error:
        _, field = structured_outputs_of(body)
        raise APIError(400, str(error), param=field or None) from None


@dataclass
class Submission:
    """A request's prompts on their way into the engine (one engine request per prompt)."""

    prompts: list[list[int]]
    params: SamplingParams
    id_prefix: str

    @classmethod
    def new(cls, kind: str, prompts: list[list[int]], params: SamplingParams) -> "Submission":
        return cls(prompts, params, f"{kind}-{uuid.uuid4().hex}")


_FINISHED = object()


async def stream_outputs(state: ServerState, engine: AsyncLLMEngine,
                         submission: Submission) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, RequestOutput) for every step of every prompt, in arrival order.

    Leaving the loop early (client gone, error) cancels the per-prompt tasks, whose
    `engine.generate` iterators then abort their requests before the next engine step.
    """
    queue: asyncio.Queue = asyncio.Queue()
    state.output_queues.add(queue)

    async def pump(index: int, request_id: str) -> None:
        state.active_request_ids.add(request_id)
        try:
            prompt = {"prompt_token_ids": submission.prompts[index]}
            async for output in engine.generate(prompt, submission.params, request_id):
                queue.put_nowait((index, output))
            queue.put_nowait((index, _FINISHED))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # handed to the consumer, which answers the client
            if not engine.is_running and engine.error is not None:
                # A dead loop applies no more aborts: take the request out here, so the
                # engine holds nothing for it (no step can be running any more).
                engine.llm_engine.abort_request(request_id)
            queue.put_nowait((index, error))
        finally:
            state.active_request_ids.discard(request_id)

    tasks = [asyncio.create_task(pump(i, f"{submission.id_prefix}-{i}"))
             for i in range(len(submission.prompts))]
    last_token_time: dict[tuple[int, int], float] = {}
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _FINISHED:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise as_api_error(item)
            _observe(state, index, item, last_token_time)
            yield index, item
    finally:
        state.output_queues.discard(queue)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):  # the engine's own validation: the request's fault
        return APIError(400, str(error))
    # The engine loop died (RuntimeError from AsyncLLMEngine) or a kiln bug: not the
    # client's fault, and nothing a retry here would fix soon.
    return APIError(503, f"the engine failed: {error}", code="engine_error")


def _observe(state: ServerState, index: int, output: RequestOutput,
             last_token_time: dict[tuple[int, int], float]) -> None:
    now = time.monotonic()
    state.progressed()
    for completion in output.outputs:
        if completion.delta_token_ids:
            key = (index, completion.index)
            if key in last_token_time:
                state.metrics.itl.observe(now - last_token_time[key])
            last_token_time[key] = now
    if output.finished:
        state.metrics.observe_finished(output)

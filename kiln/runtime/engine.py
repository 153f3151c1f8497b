"""LLMEngine: the one loop. add_request → step() → RequestOutputs.

    step():
      out = scheduler.schedule()          which requests compute how many tokens
      res = runner.execute(out)           forward + sample
      changed = scheduler.update(out, res)  append tokens, stop checks, free blocks
      detokenize changed requests         text deltas; a stop string finishes the request
      → one RequestOutput per touched user request (its n sequences grouped)

With overlap scheduling (default on CUDA) the host does not wait for step N before
scheduling and launching step N+1, so its Python work hides behind the GPU's:

    step k:  out_k = schedule(); launched_k = runner.execute_async(out_k)
             res_{k-1} = runner.collect(launched_{k-1}); update(out_{k-1}, res_{k-1}) ...

and step() returns the outputs of the step before. A request that stops on a token has then
been scheduled once more than needed; the scheduler drops that extra token. Steps run
synchronously while any live request uses repetition/frequency/presence penalties, which
need every previous token on the host.

With pipeline parallelism (pp > 1) the engine keeps up to pp steps in flight instead, each
a micro-batch of requests no other step in flight holds (vLLM's batch queue): stage 0
computes micro-batch b + 1 while stage 1 computes b. step() launches a micro-batch while
there is room and something to run, else collects the oldest and returns its outputs. With
overlap scheduling and fewer live requests than stages, steps of the same requests chain
instead (placeholders; see _step_micro_batches).

Structured outputs (kiln/structured): a request's grammar compiles on a worker thread; until
it is ready the request waits here, outside the scheduler. While any constrained sequence
lives, a step's sampling is deferred: the forward of step k is queued, the tokens of step
k-1 are committed and advance the grammar matchers (on the host, while the forward runs),
then step k's token bitmask is built and its sampling queued:

    launched_k = runner.execute_async(out_k, defer_sampling=True)   forward only
    finish step k-1 (collect, update, matchers advance)
    launched_k = runner.sample_deferred(launched_k, bitmask_k)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kiln.compiler.manifest import EngineInfo, open_engine
from kiln.checkpoint.tokenizer import load_tokenizer
from kiln.config import EngineConfig
from kiln.errors import KilnError
from kiln.parallel.state import SINGLE_PROCESS
from kiln.runtime import collector
from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.model_runner import LaunchedStep, ModelRunner
from kiln.runtime.messages import SchedulerOutput, TokenLogprobs
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.request_output import CompletionOutput, RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerConfig
from kiln.quant.fp8 import check_fp8_device
from kiln.runtime.kv_tensors import FP8_KV_DTYPE, default_block_size, kv_cache_torch_dtype

if TYPE_CHECKING:
    from kiln.spec.config import SpeculativeConfig
    from concurrent.futures import Future

    from kiln.structured.backend import StructuredOutputManager

PromptType = str | list[int] | dict

logger = logging.getLogger("kiln.engine")


@dataclass
class _Sequence:
    """Engine-side state of one of a request's n sequences."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    num_reported_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    # This step's additions, reported once in the next RequestOutput.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class _UserRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence] = field(default_factory=list)
    final_only: bool = False  # SamplingParams.output_kind "final_only": report only the end

    @property
    def finished(self) -> bool:
        if len(self.sequences) == 1:  # the common case, asked of every request every step
            return self.sequences[0].request.is_finished
        return all(s.request.is_finished for s in self.sequences)


@dataclass
class StartupReport:
    """What start-up cost: opening (manifest + hash verification), loading the weights,
    allocating the KV cache, capturing CUDA graphs."""

    load_seconds: float
    kv_profile_seconds: float  # the profiling forward that sizes the KV cache (CUDA)
    kv_allocation_seconds: float
    num_kv_blocks: int
    kv_cache_bytes: int
    graph_capture_seconds: float
    graph_memory_bytes: int
    num_graphs: int
    open_seconds: float = 0.0  # set by from_engine_dir, which opens the engine

    @property
    def total_seconds(self) -> float:
        return (self.open_seconds + self.load_seconds + self.kv_profile_seconds
                + self.kv_allocation_seconds + self.graph_capture_seconds)

    def describe(self) -> str:
        graphs = (
            f", {self.num_graphs} CUDA graphs captured in {self.graph_capture_seconds:.1f} s "
            f"({self.graph_memory_bytes / 2**20:.0f} MiB)" if self.num_graphs else ""
        )
        return (
            f"start-up {self.total_seconds:.1f} s: open + verify {self.open_seconds:.1f} s, "
            f"load {self.load_seconds:.1f} s, KV cache {self.kv_cache_bytes / 2**30:.1f} GiB "
            f"({self.num_kv_blocks} blocks) sized in {self.kv_profile_seconds:.1f} s and "
            f"allocated in {self.kv_allocation_seconds:.1f} s{graphs}"
        )


# Offline batches of at least this many requests are frozen once queued (offline_batch).
OFFLINE_FREEZE_AT = 1024


@dataclass
class EngineStats:
    """Where the time of the engine loop went (read by the benchmarks)."""

    num_steps: int = 0
    step_seconds: float = 0.0  # wall time inside step()
    wait_seconds: float = 0.0  # of which blocked on the GPU (runner.collect)
    gpu_seconds: float = 0.0  # device time of the collected steps (CUDA events)

    @property
    def host_seconds(self) -> float:
        return self.step_seconds - self.wait_seconds


def _world_size(engine_info: EngineInfo, config: EngineConfig) -> int:
    """Ranks the engine runs on: its layout's, refused (one line) if the config asks for
    another (tensor_parallel_size / pipeline_parallel_size None: the engine's)."""
    layout = engine_info.layout
    wanted = (config.tensor_parallel_size or layout.tp, config.pipeline_parallel_size or layout.pp)
    if wanted != (layout.tp, layout.pp):
        from kiln.parallel.executor import check_layout

        check_layout(engine_info, *wanted)  # raises, naming both layouts
    return layout.tp * layout.pp


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:  # torch's message lists every device type
        raise KilnError(f"device {name!r} is not a device name: use 'cuda', 'cuda:N' or 'cpu'") from error
    if device.type not in ("cuda", "cpu"):
        raise KilnError(f"device {name!r} is not supported: use 'cuda', 'cuda:N' or 'cpu'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KilnError(f"device {name!r} requested, but no CUDA GPU is available")
    return device


class LLMEngine:
    """One engine loop over one engine directory. Closing it (`close()`, or leaving a `with`
    block) frees its device memory, so a process may build engines one after another."""

    def __init__(
        self,
        engine_info: EngineInfo,
        config: EngineConfig | None = None,
        speculative_config: "SpeculativeConfig | dict | None" = None,
    ) -> None:
        """speculative_config: vLLM's dict shape or a kiln.spec SpeculativeConfig (None:
        no speculative decoding); validated before anything is loaded."""
        from kiln.spec.config import SpeculativeConfig

        speculative_config = SpeculativeConfig.from_dict(speculative_config)
        self.config = config = config or EngineConfig()
        self.engine_info = engine_info
        self.model_config = engine_info.model_config
        self.max_model_len = config.max_model_len or engine_info.max_model_len
        if self.max_model_len > engine_info.max_model_len:
            raise KilnError(
                f"max_model_len {self.max_model_len} exceeds the engine's "
                f"{engine_info.max_model_len} (rebuild with a larger --max-model-len)"
            )
        self.device = resolve_device(config.device)
        if config.dtype != "auto":
            self.dtype = getattr(torch, config.dtype)
        else:
            self.dtype = engine_info.dtype if self.device.type == "cuda" else torch.float32
        # KV cache dtype ("fp8": E4M3) and the FP8 device check (quantisation, issue 11).
        self.kv_cache_dtype = kv_cache_torch_dtype(
            config.kv_cache_dtype, self.dtype, engine_info.manifest.get("build", {}))
        if self.kv_cache_dtype == FP8_KV_DTYPE or engine_info.quant_config.scheme == "fp8":
            check_fp8_device(self.device)
        # The cache dtype's default block size (an FP8 cache's own), unless the user chose one.
        if "block_size" not in config.model_fields_set:
            self.config = config = config.model_copy(
                update={"block_size": default_block_size(self.kv_cache_dtype)})
        tokenizer_dir = engine_info.tokenizer_dir
        self.tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        eos = engine_info.generation_config.get("eos_token_id")
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        # The processes holding slices of the model, and their groups: this one process at
        # tp × pp = 1; otherwise an executor runs the other ranks (kiln/parallel/executor.py)
        # and stands where the runner stands. close() ends them.
        self.parallel = SINGLE_PROCESS
        # Speculative decoding's proposer: a draft engine is loaded (and its KV cache sized)
        # before the target's runner, whose memory profile then counts it as in use.
        self.speculator = None
        if speculative_config is not None:
            from kiln.spec.factory import build_speculator

            self.speculator = build_speculator(
                speculative_config, engine_info, engine_config=config, device=self.device,
                dtype=self.dtype, max_model_len=self.max_model_len,
            )
        self.runner = self._start_parallel(engine_info, config) if _world_size(
            engine_info, config) > 1 else ModelRunner(
            engine_info, self.device, self.dtype, config.block_size, config.num_kv_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_cuda_graphs=config.enable_cuda_graphs,
            gpu_memory_utilization=config.gpu_memory_utilization,
            cpu_kv_cache_bytes=config.cpu_kv_cache_bytes,
            kv_cache_dtype=self.kv_cache_dtype,
            parallel=self.parallel,
        )
        num_blocks = self.runner.num_kv_blocks
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_kv_blocks=num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                max_prefill_tokens_while_decoding=config.max_prefill_tokens_while_decoding,
                capacity_policy=config.capacity_policy,
            )
        )
        if self.speculator is not None:
            self.scheduler.speculation_stats = self.speculator.stats
        runner = self.runner
        capture = runner.capture_report
        self.startup = StartupReport(
            load_seconds=runner.load_seconds,
            kv_allocation_seconds=runner.kv_allocation_seconds,
            num_kv_blocks=num_blocks,
            kv_cache_bytes=num_blocks * runner.kv_cache_spec.bytes_per_block(config.block_size),
            kv_profile_seconds=runner.memory_profile.seconds if runner.memory_profile else 0.0,
            graph_capture_seconds=capture.seconds if capture else 0.0,
            graph_memory_bytes=capture.memory_bytes if capture else 0,
            num_graphs=len(capture.sizes) if capture else 0,
        )
        self._requests: dict[str, _UserRequest] = {}
        self._sequence_owner: dict[str, _UserRequest] = {}
        self._ids = itertools.count()
        overlap = config.overlap_scheduling
        self.overlap_scheduling = self.device.type == "cuda" if overlap is None else overlap
        if not getattr(self.runner, "supports_overlap", True) or (
                self.speculator is not None and getattr(self.runner, "max_in_flight", 1) > 1):
            # Parallel steps that cannot overlap (executor.py); at pp > 1 overlapped steps
            # exist only in the micro-batch loop, which speculation does not use.
            self.overlap_scheduling = False
        # Launched steps whose results a later step() collects, oldest first: one with
        # overlap scheduling, up to pp pipeline micro-batches (kiln/parallel/executor.py;
        # speculative decoding's proposals need each step's outcome, so not with it).
        self._in_flight: deque[tuple[SchedulerOutput, LaunchedStep]] = deque()
        self._max_in_flight = (getattr(self.runner, "max_in_flight", 1)
                               if self.speculator is None else 1)
        # Live sequences with penalties: while any exists, steps run synchronously.
        self._num_penalised_sequences = 0
        # Structured outputs: the grammar compiler, the matchers and the requests waiting for
        # their grammar (made on first use, so an engine without xgrammar works until a
        # request asks for a grammar).
        self._structured: StructuredOutputManager | None = None
        self._structured_lock = threading.Lock()
        # Host seconds spent in step() (minus what the runner reports as waiting) and steps
        # taken: with runner.gpu_seconds, the CPU time per step next to the GPU time.
        self.stats = EngineStats()
        self._closed = False
        # Set when from_engine_dir froze the start-up heap (CUDA): the thresholds before.
        self._collector_before: tuple[int, int, int] | None = None

    def _start_parallel(self, engine_info: EngineInfo, config: EngineConfig):
        from kiln.parallel.executor import ParallelExecutor

        executor = ParallelExecutor.start(engine_info, config, self.device, self.dtype,
                                          self.kv_cache_dtype, self.max_model_len)
        self.parallel = executor.parallel
        return executor

    @classmethod
    def from_engine_dir(
        cls, path: str | Path, config: EngineConfig | None = None, speculative_config=None
    ) -> "LLMEngine":
        config = config or EngineConfig()
        started = time.perf_counter()
        info = open_engine(path, verify_hashes=config.verify_hashes)
        opened = time.perf_counter() - started
        engine = cls(info, config, speculative_config)
        engine.startup.open_seconds = opened
        logger.info("%s", engine.startup.describe())
        collector.engine_thresholds()  # a malformed KILN_GC_THRESHOLD fails on every device
        if engine.device.type == "cuda":
            # The model, tokenizer and caches are long-lived: out of the collector's sight, and
            # its passes made rarer (kiln/runtime/collector.py); close() undoes both. Not on
            # the CPU, where tests build many short-lived engines.
            engine._collector_before = collector.tune_for_engine()
        return engine

    # ---- lifetime -----------------------------------------------------------------------

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Abort every request and free the engine's device memory: KV cache, CUDA graphs
        and their pool, weights, buffers. Idempotent; the engine cannot step afterwards."""
        if self._closed:
            return
        self._closed = True
        in_flight, self._in_flight = self._in_flight, deque()
        if in_flight and in_flight[-1][0].share_sampled_ids:
            # Stage 0 takes a marked step's sampled ids at the start of the next step.
            follow = SchedulerOutput(scheduled=[])
            try:
                in_flight.append((follow, self.runner.execute_async(follow)))
            except KilnError:  # a failed parallel engine: no follow step; the loop below stops
                pass
        for _, launched in in_flight:  # their kernels still use the caches
            try:
                self.runner.collect(launched)
            except KilnError:  # a failed parallel engine: there is nothing left to wait for
                break
        self.abort_all()
        if self._structured is not None:
            self._structured.close()
        self.runner.close()
        if self.speculator is not None:
            self.speculator.close()
        self.parallel.close()
        # Objects frozen at start-up (from_engine_dir) are invisible to the collector; the
        # model's reference cycles (parameters holding bound weight loaders) need it.
        collector.restore(self._collector_before)  # and the thresholds as they were
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---- requests ---------------------------------------------------------------------

    def _tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KilnError("this engine has no tokenizer: pass prompt_token_ids instead of text")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def prepare_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt, validated: raises ValueError naming the problem
        (empty, a token id outside the vocabulary) before anything is queued."""
        prompt_text, token_ids = self._tokenize_prompt(prompt)
        self.validate_prompt(token_ids)
        return prompt_text, token_ids

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        for token_id in token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab:
                raise ValueError(f"prompt token id {token_id!r} is outside the vocabulary [0, {vocab})")

    def add_request(
        self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None
    ) -> str:
        """Validate and queue a request (all n sequences or none). Raises ValueError naming
        the problem before any state changes."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._closed:
            raise KilnError("the engine is closed")
        prompt_text, token_ids = self.prepare_prompt(prompt)
        room = self.max_model_len - len(token_ids)
        if params.max_tokens is None:
            if room < 1:
                raise ValueError(
                    f"prompt has {len(token_ids)} tokens, leaving no room to generate within "
                    f"max_model_len {self.max_model_len}"
                )
            params = dataclasses.replace(params, max_tokens=room)
        primary_eos = self.eos_token_ids[0] if self.eos_token_ids else None
        extra_eos = [t for t in self.eos_token_ids[1:] if t not in params.stop_token_ids]
        if extra_eos and not params.ignore_eos:
            params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *extra_eos])
        user_request = _UserRequest(request_id, prompt_text, token_ids,
                                    final_only=params.output_kind == "final_only")
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                child_params = dataclasses.replace(params, n=1, seed=seed)
            sequence_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(sequence_id, list(token_ids), child_params, eos_token_id=primary_eos)
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
                if self.tokenizer is not None else None
            )
            logprobs = [] if child_params.logprobs is not None else None
            user_request.sequences.append(_Sequence(request, detokenizer, logprobs=logprobs))
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.structured_outputs().submit(params.structured_outputs)
        if grammar is None or grammar.done():
            self._schedule_sequences(user_request, grammar)
        else:
            self._structured.hold(request_id, user_request, grammar)
        for sequence in user_request.sequences:
            self._sequence_owner[sequence.request.request_id] = user_request
        if params.uses_penalties:
            self._num_penalised_sequences += len(user_request.sequences)
        self._requests[request_id] = user_request
        return request_id

    def _schedule_sequences(self, user_request: _UserRequest,
                            grammar: Future | None) -> None:
        """Hand a request's sequences to the scheduler (all or none), each with its own
        grammar matcher when it is constrained (grammar: its compile, done)."""
        added: list[Request] = []
        try:
            for sequence in user_request.sequences:
                if grammar is not None:
                    self._structured.start(sequence.request.request_id, grammar.result(),
                                           sequence.request.sampling_params.structured_outputs)
                self.scheduler.add_request(sequence.request)
                added.append(sequence.request)
        except ValueError:
            for sequence in user_request.sequences:
                if self._structured is not None:
                    self._structured.drop(sequence.request.request_id)
            for request in added:
                self.scheduler.abort_request(request.request_id)
            raise

    @contextlib.contextmanager
    def offline_batch(self, count: int):
        """Around running an offline batch of `count` requests already added (LLM.generate,
        `kiln bench throughput`): at OFFLINE_FREEZE_AT or more, they (and everything else
        alive) are moved out of the collector's sight for the run. They live for the whole
        run, and its full passes walked them every ~20 steps and freed nothing: kiln's
        request objects form no cycles and go by reference counting (benchmarks/
        host_profile.py at 1,024 rows, 30,000 requests: 168 full passes, 6.3 s of 55 s of
        host time, 0 objects freed). Afterwards one full pass collects whatever became cyclic
        garbage meanwhile (the caller's objects too) and the start-up freeze is restored."""
        if count < OFFLINE_FREEZE_AT:
            yield
            return
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            gc.collect()
            if self._collector_before is not None:  # the start-up freeze
                gc.freeze()

    def structured_outputs(self) -> StructuredOutputManager:
        """The grammar compiler and matchers (kiln/structured/backend.py), made on first
        use; ValueError naming why when this engine cannot constrain outputs."""
        with self._structured_lock:  # request handlers' threads and the engine loop's
            if self._structured is not None:
                return self._structured
            if self.tokenizer is None:
                raise ValueError("structured outputs need the engine's tokenizer, and this "
                                 "engine has none")
            if self.speculator is not None:
                # Proposals would need the grammar too (rolled back on rejection): not built.
                raise ValueError("structured outputs cannot be combined with speculative "
                                 "decoding on this engine: start it without a speculative config")
            if not hasattr(self.runner, "sample_deferred"):
                raise ValueError("structured outputs are not supported on tensor- or "
                                 "pipeline-parallel engines yet")
            from kiln.structured.backend import StructuredOutputManager

            self._structured = StructuredOutputManager(
                self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
            return self._structured

    def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Compile params' grammar now (cached), raising ValueError naming the problem if it
        does not compile. For callers off the step loop (LLM.generate, request handlers),
        so a bad constraint is refused before the request is queued."""
        if params.structured_outputs is not None:
            self.structured_outputs().compile_blocking(params.structured_outputs)

    def _admit_compiled_grammars(self) -> list[RequestOutput]:
        """Requests whose grammar finished compiling go to the scheduler; those whose grammar
        failed (only when nobody compiled it first) or that the scheduler refuses finish as
        aborted, the error as their stop_reason (never raised: this runs inside step())."""
        idle = not self._in_flight and not self.scheduler.has_unfinished_requests()
        outputs = []
        for request_id, user_request, future in self._structured.compiled(wait=idle):
            error = future.exception()
            if error is None:
                try:
                    self._schedule_sequences(user_request, future)
                    continue
                except ValueError as scheduling_error:  # say, larger than the whole cache
                    error = scheduling_error
            logger.warning("request %s: %s", request_id, error)
            for sequence in user_request.sequences:
                sequence.request.status = RequestStatus.FINISHED_ABORTED
                sequence.request.stop_reason = str(error)
            outputs.append(self._make_output(user_request))
            self._forget(user_request)
        return outputs

    def abort_request(self, request_id: str) -> bool:
        user_request = self._requests.get(request_id)
        if user_request is None:
            return False
        if self._structured is not None:
            self._structured.release(request_id)
        for sequence in user_request.sequences:
            self.scheduler.abort_request(sequence.request.request_id)
        self._forget(user_request)
        self._tell_runner_if_idle()
        return True

    def abort_all(self) -> int:
        """Abort every request; returns how many there were."""
        request_ids = list(self._requests)
        for request_id in request_ids:
            self.abort_request(request_id)
        return len(request_ids)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self._in_flight)
                or (self._structured is not None and self._structured.has_waiting))

    def _tell_runner_if_idle(self) -> None:
        """Once nothing is left to run, send the runner the finished requests' ids now (an
        empty step message) rather than with the next request's first step: an idle engine
        holds nothing of past requests."""
        if (
            not self._in_flight
            and not self.scheduler.has_unfinished_requests()
            and self.scheduler.has_finished_requests()
        ):
            self.runner.collect(self.runner.execute_async(self.scheduler.schedule()))

    def _forget(self, user_request: _UserRequest) -> None:
        """Drop the engine's own trace of a finished or aborted request now (the scheduler
        tells the runner in its next step message)."""
        if self._requests.pop(user_request.request_id, None) is None:
            return
        if user_request.sequences[0].request.sampling_params.uses_penalties:
            self._num_penalised_sequences -= len(user_request.sequences)
        for sequence in user_request.sequences:
            self._sequence_owner.pop(sequence.request.request_id, None)
            if self._structured is not None:
                self._structured.drop(sequence.request.request_id)
        if self.speculator is not None:
            self.speculator.drop([s.request.request_id for s in user_request.sequences])

    # ---- the loop ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self._closed:
            raise KilnError("the engine is closed")
        started = time.perf_counter()
        waited, gpu = self.runner.wait_seconds, self.runner.gpu_seconds
        waiting = self._structured is not None and self._structured.has_waiting
        admitted = self._admit_compiled_grammars() if waiting else []
        outputs = self._step()
        if admitted:
            outputs = admitted + outputs
        self._tell_runner_if_idle()
        self.stats.num_steps += 1
        self.stats.step_seconds += time.perf_counter() - started
        self.stats.wait_seconds += self.runner.wait_seconds - waited
        self.stats.gpu_seconds += self.runner.gpu_seconds - gpu
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self._max_in_flight > 1:
            return self._step_micro_batches()
        previous = self._in_flight.popleft() if self._in_flight else None
        speculator = self.speculator
        running = self.scheduler.running_requests if speculator is not None else ()
        # Proposals continue a request's last token, which the host must know: a step with
        # any runs synchronously (see DESIGN.md, "Speculative decoding").
        speculate = bool(running) and speculator.wants_to_speculate(running)
        overlap = (self.overlap_scheduling and self._num_penalised_sequences == 0
                   and not speculate)
        if previous is not None and not overlap:
            # Penalties or proposals: finish the step in flight before scheduling the next.
            return self._finish_step(*previous)
        if speculate:
            speculator.propose(running)
        scheduler_output = self.scheduler.schedule()
        if speculator is not None:
            speculator.step_launched()
        outputs: list[RequestOutput] = []
        if self._structured is not None and self._structured.has_matchers:
            # The forward first; the grammar masks need the previous step's tokens, which
            # are committed while it runs (see the module docstring).
            launched = self.runner.execute_async(scheduler_output, defer_sampling=True)
            if previous is not None:
                outputs = self._finish_step(*previous)
                previous = None
            bitmask = self._structured.token_bitmask(launched.request_ids,
                                                     pin_memory=self.device.type == "cuda")
            launched = self.runner.sample_deferred(launched, bitmask)
        else:
            launched = self.runner.execute_async(scheduler_output)
        if not overlap:
            return self._finish_step(scheduler_output, launched)
        if not scheduler_output.is_empty:
            self._in_flight.append((scheduler_output, launched))
        return self._finish_step(*previous) if previous is not None else outputs

    def _step_micro_batches(self) -> list[RequestOutput]:
        """Pipeline parallelism: launch another micro-batch while fewer than pp are in
        flight and some request is free to run, else finish the oldest. A micro-batch takes
        at most its share of the live requests (ceil(live / pp)), so pp of them fill the
        pipeline; each stage runs the steps in launch order.

        With overlap scheduling and fewer live requests than stages (no disjoint micro-
        batches to fill the pipeline with), steps are chained instead: one step takes every
        free request and is marked (`share_sampled_ids`: the last stage sends its sampled
        ids to stage 0), and the next step may schedule the marked step's requests again,
        with placeholders that stage 0 fills from those ids. Stage 0 takes them at the
        start of the step after a marked one, so one always follows (without rows if need
        be)."""
        in_flight = self._in_flight
        last = in_flight[-1][0] if in_flight else None
        must_follow = last is not None and last.share_sampled_ids
        if len(in_flight) < self._max_in_flight:
            busy = {chunk.request_id for output, _ in in_flight for chunk in output.scheduled}
            if must_follow:
                busy -= {chunk.request_id for chunk in last.scheduled}
            scheduler = self.scheduler
            live = min(scheduler.num_running + scheduler.num_waiting, self.config.max_num_seqs)
            chained = (self.overlap_scheduling and self._num_penalised_sequences == 0
                       and live < self._max_in_flight)
            share = None if chained else max(1, -(-live // self._max_in_flight))
            scheduler_output = scheduler.schedule(skip_request_ids=busy, max_rows=share)
            if chained and any(chunk.logits_offsets for chunk in scheduler_output.scheduled):
                scheduler_output = dataclasses.replace(scheduler_output, share_sampled_ids=True)
            if (must_follow or scheduler_output.scheduled
                    or scheduler_output.finished_request_ids
                    or scheduler_output.preempted_request_ids):
                # Every launched step is collected, in order: the ranks answer each one.
                in_flight.append((scheduler_output, self.runner.execute_async(scheduler_output)))
                if not scheduler_output.is_empty and len(in_flight) < self._max_in_flight:
                    return []  # room for another micro-batch: the next step() tries
        return self._finish_step(*in_flight.popleft()) if in_flight else []

    def _finish_step(
        self, scheduler_output: SchedulerOutput, launched: LaunchedStep
    ) -> list[RequestOutput]:
        runner_output = self.runner.collect(launched)
        changed = self.scheduler.update(scheduler_output, runner_output)
        if self.speculator is not None:
            self.speculator.record(scheduler_output, runner_output)
        touched: dict[str, _UserRequest] = {}
        for request in changed:
            user_request = self._sequence_owner.get(request.request_id)
            if user_request is None:
                continue
            if self._structured is not None and request.request_id in self._structured:
                self._advance_grammar(request)
            sequence = next(s for s in user_request.sequences if s.request is request)
            self._advance_sequence(sequence, runner_output.logprobs.get(request.request_id, []))
            touched[user_request.request_id] = user_request
        outputs = []
        for user_request in touched.values():
            finished = user_request.finished
            if finished or not user_request.final_only:
                outputs.append(self._make_output(user_request))
            if finished:
                self._forget(user_request)
        return outputs

    def _advance_grammar(self, request: Request) -> None:
        """Feed a constrained sequence's new tokens to its matcher; a complete grammar ends
        the request ("stop", also under ignore_eos)."""
        from kiln.structured.backend import GrammarProgress

        progress = self._structured.advance(request.request_id, request.output_token_ids)
        if progress is GrammarProgress.TERMINATED:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED,
                                          request.stop_reason)
        elif progress is GrammarProgress.REJECTED:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED,
                                          "the output broke its grammar")

    def _advance_sequence(self, sequence: _Sequence, logprobs: list[TokenLogprobs]) -> None:
        request = sequence.request
        new_ids = request.output_token_ids[sequence.num_reported_tokens:]
        detokenizer = sequence.detokenizer
        delta = ""
        if detokenizer is not None:
            # Before the detokenizer runs, a STOPPED status can only come from a token (EOS
            # or a stop token id): stop strings are found below.
            stopped_by_token = request.status is RequestStatus.FINISHED_STOPPED
            if len(new_ids) == 1:
                delta = detokenizer.update(new_ids, stop_terminated=stopped_by_token)
            else:
                # Several tokens (speculative decoding): one at a time, so a stop string
                # ends the output at the token that completed it, as without speculation.
                for index, token_id in enumerate(new_ids):
                    last = index == len(new_ids) - 1
                    delta += detokenizer.update([token_id], stop_terminated=stopped_by_token and last)
                    if detokenizer.stop_hit is not None and not last:
                        del request.output_token_ids[sequence.num_reported_tokens + index + 1:]
                        request.metrics.num_output_tokens = request.num_output_tokens
                        new_ids = new_ids[: index + 1]
                        break
            if detokenizer.stop_hit is not None:
                self.scheduler.finish_request(
                    request.request_id, RequestStatus.FINISHED_STOPPED, detokenizer.stop_hit
                )
        sequence.num_reported_tokens = request.num_output_tokens
        sequence.delta_token_ids = new_ids
        if sequence.logprobs is not None:
            # Never more than the tokens kept (a stop ends a verify row's tokens early).
            sequence.logprobs.extend(logprobs[: len(new_ids)])
        if detokenizer is None:
            sequence.delta_text = ""
            return
        if request.is_finished:
            delta += detokenizer.finish()
        sequence.delta_text = delta

    def _make_output(self, user_request: _UserRequest) -> RequestOutput:
        completions = []
        for index, sequence in enumerate(user_request.sequences):
            request = sequence.request
            completions.append(
                CompletionOutput(
                    index=index,
                    text=sequence.detokenizer.text if sequence.detokenizer else "",
                    token_ids=list(request.output_token_ids),
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                    logprobs=list(sequence.logprobs) if sequence.logprobs is not None else None,
                    delta_text=sequence.delta_text,
                    delta_token_ids=sequence.delta_token_ids,
                )
            )
            sequence.delta_text, sequence.delta_token_ids = "", []
        return RequestOutput(
            request_id=user_request.request_id,
            prompt=user_request.prompt,
            prompt_token_ids=user_request.prompt_token_ids,
            outputs=completions,
            finished=user_request.finished,
            metrics=[s.request.metrics for s in user_request.sequences],
        )

"""Offline throughput: N requests submitted at once, run to completion.

Figures: output tokens/s, total (prompt + output) tokens/s, requests/s. With
`sequential_baseline`, the same requests also run one at a time through the same engine, the
way a loop without in-flight batching would serve them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from kiln.bench.datasets import BenchRequest
from kiln.bench.progress import Progress
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from kiln.structured.params import StructuredOutputsParams

# `--structured json`: records with free-length strings and an open array, so a noise model's
# outputs mostly run to max_tokens as unconstrained ones do (a complete record ends early).
BENCH_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "title": {"type": "string"},
                   "tags": {"type": "array", "items": {"type": "string"}},
                   "body": {"type": "string"}},
    "required": ["id", "title", "tags", "body"],
    "additionalProperties": False,
}
STRUCTURED_CHOICES = ("json",)


def _params(request: BenchRequest, structured: StructuredOutputsParams | None = None) -> SamplingParams:
    # As vLLM's benchmark: sample at temperature 1 and ignore EOS, so every request produces
    # exactly its output length and runs are comparable; as its LLM.generate, report only the
    # finished request. A structured request still ends when its grammar is complete.
    return SamplingParams(temperature=1.0, max_tokens=request.output_len, ignore_eos=True,
                          output_kind="final_only", structured_outputs=structured)


def structured_constraint(kind: str) -> StructuredOutputsParams:
    if kind == "json":
        return StructuredOutputsParams(json=BENCH_SCHEMA)
    raise ValueError(f"--structured must be one of {', '.join(STRUCTURED_CHOICES)}, got {kind!r}")


def grammar_tokenizer(source: str, vocab_size: int):
    """The tokenizer a random-weight engine's grammars use: a directory of tokenizer files
    (tokenizer.json), or another model's. Its ids must fit the model's."""
    from kiln.checkpoint.tokenizer import borrowed_tokenizer

    return borrowed_tokenizer(source, vocab_size)


def fifty_field_schema(salt: str) -> dict:
    """A 50-field object schema of mixed types; `salt` in the names makes it a cache miss."""
    kinds = ({"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "string", "maxLength": 32},
             {"type": "number"}, {"type": "boolean"}, {"enum": ["a", "b", "c"]},
             {"type": "array", "items": {"type": "string"}, "maxItems": 4})
    properties = {f"{salt}_field_{i}": kinds[i % len(kinds)] for i in range(50)}
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def grammar_compile_figures(engine: LLMEngine) -> dict:
    """Milliseconds to set the grammar engine up (the tokenizer's vocabulary, once per
    engine, with the first compile) and to compile a fresh 50-field schema afterwards."""
    compiler = engine.structured_outputs().compiler
    started = time.perf_counter()
    compiler.compile_blocking(StructuredOutputsParams(json=fifty_field_schema(f"warm{time.time_ns()}")))
    first = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile_blocking(StructuredOutputsParams(json=fifty_field_schema(f"s{time.time_ns()}")))
    return {"grammar_first_compile_ms": 1e3 * first,
            "grammar_compile_ms_50_fields": 1e3 * (time.perf_counter() - started)}


def _triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache: one more per compilation, so a count that grows
    during a run means a step waited for a compile (a second or more each)."""
    from triton import knobs

    directory = Path(knobs.cache.dir)
    return sum(1 for _ in directory.iterdir()) if directory.is_dir() else 0


def _allocator_counts(device: torch.device) -> tuple[int, int]:
    """(cudaMalloc calls, allocation retries) of the caching allocator so far; (0, 0) off
    CUDA. A retry frees the cache after synchronising the device: the host waits on the GPU
    outside collect(), so it shows as host time."""
    if device.type != "cuda":
        return 0, 0
    stats = torch.cuda.memory_stats(device)
    return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)


def run_batched(engine: LLMEngine, requests: list[BenchRequest], progress: Progress | None = None,
                structured: StructuredOutputsParams | None = None) -> dict:
    """All requests at once; `progress` (if any) advances by each finished request's tokens.
    structured: every request constrained by it (compiled before the clock starts)."""
    grammar_host = None
    if structured is not None:
        engine.compile_structured_outputs(_params(requests[0], structured))
        manager = engine.structured_outputs()
        grammar_host = (manager.mask_seconds, manager.advance_seconds, manager.num_masks)
    stats_before = dataclasses.replace(engine.stats)
    cache_entries_before = _triton_cache_entries()
    runner = engine.runner
    graph_before = (runner.graph_steps, runner.graph_gpu_seconds)
    started = time.perf_counter()
    for request in requests:
        engine.add_request(None, {"prompt_token_ids": request.prompt_token_ids},
                           _params(request, structured))
    steps = 0
    output_tokens = 0
    preemptions = 0
    stopped = 0
    # rows bucket → [steps, host seconds, GPU seconds, cudaMallocs, allocation retries]
    by_rows: dict[int, list[float]] = {}
    allocator_before = allocator = _allocator_counts(engine.device)  # one read per step
    stats = engine.stats  # updated in place by step()
    # With overlap scheduling a step() launches its step and collects the previous one's
    # device time, so that time goes to the previous step's bucket (charged to the step
    # that collected it, the first ramp-up steps' buckets read host 43.6 ms against GPU 0).
    # Pipeline-parallel runs keep up to pp steps in flight: their buckets stay approximate.
    lagged = engine.overlap_scheduling
    previous_bucket = None
    # Decode-only steps (CUDA graphs) and the rest apart, [steps, host s, GPU s] each: the
    # buckets mix them, and a batch's decode steps can be host-bound while its prefill-heavy
    # eager steps hide it. A step is known to be a graph step once collected
    # (runner.graph_steps), under overlap by the next call, which also has its device time.
    by_kind = {"graph": [0, 0.0, 0.0], "eager": [0, 0.0, 0.0]}
    pending_host = None  # under overlap: host time of the step the last call launched
    with engine.offline_batch(len(requests)):  # as LLM.generate
        while engine.has_unfinished_requests():
            host, gpu = stats.host_seconds, stats.gpu_seconds
            graphs = runner.graph_steps
            finished = 0
            for output in engine.step():
                if output.finished:
                    finished += 1
                    output_tokens += len(output.outputs[0].token_ids)
                    stopped += output.outputs[0].finish_reason == "stop"
                    preemptions += sum(m.num_preemptions for m in output.metrics)
                    if progress is not None:
                        progress.update(len(output.outputs[0].token_ids))
            steps += 1
            # Under overlap the last call launches nothing: it collects the step before it, so
            # its host time (that step's outputs) goes where its device time goes, and it is no
            # step of a batch size of its own (counted, it read ~3 ms of host against 0 of GPU
            # and failed the check below on every run).
            drain = (lagged and previous_bucket is not None
                     and not engine.has_unfinished_requests())
            if drain:
                bucket = previous_bucket
            else:
                bucket = by_rows.setdefault(rows_bucket(engine.scheduler.num_running + finished),
                                            [0, 0.0, 0.0, 0, 0])
                bucket[0] += 1
            bucket[1] += stats.host_seconds - host
            allocator_after = _allocator_counts(engine.device)
            bucket[3] += allocator_after[0] - allocator[0]
            bucket[4] += allocator_after[1] - allocator[1]
            allocator = allocator_after
            (previous_bucket if lagged and previous_bucket is not None else bucket)[2] += (
                stats.gpu_seconds - gpu)
            previous_bucket = bucket
            call_host = stats.host_seconds - host
            if lagged and pending_host is None:  # the first call: nothing collected yet
                pending_host = call_host
                continue
            kind = by_kind["graph" if runner.graph_steps > graphs else "eager"]
            kind[0] += 1
            kind[1] += pending_host + (call_host if drain else 0.0) if lagged else call_host
            kind[2] += stats.gpu_seconds - gpu
            pending_host = call_host
    seconds = time.perf_counter() - started
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    grammar = {}
    if grammar_host is not None:
        # Host time of the grammar per masked step: mask rows filled, matchers advanced.
        # It overlaps the step's forward on the device (engine.py), so it costs throughput
        # only where it outlasts the forward.
        manager = engine.structured_outputs()
        num_masks = max(manager.num_masks - grammar_host[2], 1)
        grammar = {"grammar_mask_ms_per_step": 1e3 * (manager.mask_seconds - grammar_host[0]) / num_masks,
                   "grammar_advance_ms_per_step":
                       1e3 * (manager.advance_seconds - grammar_host[1]) / num_masks}
    return {
        **grammar,
        **rows_breakdown(by_rows),
        "seconds": seconds,
        "steps": steps,
        "preemptions": preemptions,  # each one recomputes the request's tokens so far
        "step_ms_mean": 1e3 * seconds / max(steps, 1),
        # Host time inside step() that was not spent waiting for the GPU, and device time of
        # the steps (CUDA events): with overlap scheduling the two run side by side.
        "cpu_ms_per_step": 1e3 * (stats.host_seconds - stats_before.host_seconds) / max(steps, 1),
        "gpu_ms_per_step": 1e3 * (stats.gpu_seconds - stats_before.gpu_seconds) / max(steps, 1),
        # Decode-only steps (CUDA graphs) against the rest (eager: prefill chunks, mixed).
        "graph_steps": runner.graph_steps - graph_before[0],
        "gpu_s_graph_steps": runner.graph_gpu_seconds - graph_before[1],
        "gpu_s_eager_steps": (stats.gpu_seconds - stats_before.gpu_seconds)
        - (runner.graph_gpu_seconds - graph_before[1]),
        **{f"{name}_{what}_ms_per_step": 1e3 * seconds / count
           for name, (count, host, gpu) in by_kind.items() if count
           for what, seconds in (("cpu", host), ("gpu", gpu))},
        "triton_compiles": _triton_cache_entries() - cache_entries_before,
        "cuda_mallocs": allocator[0] - allocator_before[0],
        "cuda_alloc_retries": allocator[1] - allocator_before[1],
        "output_tok_s": output_tokens / seconds,
        "total_tok_s": (output_tokens + prompt_tokens) / seconds,
        "requests_s": len(requests) / seconds,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        # Requests that ended before max_tokens (ignore_eos is on: only a complete grammar).
        "stopped_early": stopped,
    }


def rows_bucket(rows: int) -> int:
    """The power of 2 at or above a step's row count (its requests: running after the step,
    plus those it finished)."""
    return 1 << max(rows - 1, 0).bit_length()


def rows_breakdown(by_rows: dict[int, list[float]]) -> dict:
    """CPU and GPU ms per step by batch size (rows ≤ 1, 2, 4, ...), for the check that host
    time stays below device time at every batch size, and (where steps are timed on a
    device) whether it does in every bucket. The row count is read when step() returns
    (running requests plus those it finished), so a bucket's edges are approximate."""
    metrics = {}
    for bucket in sorted(by_rows):
        steps, host, gpu, *allocator = by_rows[bucket]
        metrics[f"steps_rows_le{bucket}"] = steps
        metrics[f"cpu_ms_per_step_rows_le{bucket}"] = 1e3 * host / steps
        metrics[f"gpu_ms_per_step_rows_le{bucket}"] = 1e3 * gpu / steps
        if any(allocator):
            metrics[f"cuda_mallocs_rows_le{bucket}"] = allocator[0]
            metrics[f"cuda_alloc_retries_rows_le{bucket}"] = allocator[1]
    if any(gpu for _, _, gpu, *_ in by_rows.values()):  # device timing exists (not the CPU)
        metrics["cpu_below_gpu_every_rows_bucket"] = float(all(
            host < gpu for _, host, gpu, *_ in by_rows.values()))
    return metrics


def run_sequential(engine: LLMEngine, requests: list[BenchRequest], progress: Progress | None = None) -> dict:
    """One request at a time; `progress` (if any) advances by one per finished request."""
    started = time.perf_counter()
    output_tokens = 0
    for request in requests:
        engine.add_request(None, {"prompt_token_ids": request.prompt_token_ids}, _params(request))
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    output_tokens += len(output.outputs[0].token_ids)
        if progress is not None:
            progress.update(1)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "output_tok_s": output_tokens / seconds,
        "requests_s": len(requests) / seconds,
        "output_tokens": output_tokens,
    }


def length_stats(requests: list[BenchRequest]) -> dict:
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    return {
        "num_requests": len(requests),
        "mean_input_len": sum(prompts) / len(prompts),
        "mean_output_len": sum(outputs) / len(outputs),
        "max_input_len": max(prompts),
        "max_output_len": max(outputs),
    }

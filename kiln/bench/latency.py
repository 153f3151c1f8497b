"""Latency: batch-1 decode speed against the memory roofline, time to first token against
the compute roofline, and decode throughput against batch size.

Roofline arithmetic (written into the result next to each figure):
  decode, batch 1:   bytes/token = weight bytes + KV bytes read; ceiling = copy_bw / bytes
  prefill of L:      FLOPs = 2 · (non-embedding params) · L + attention 2 · 2 · L² / 2 · H · layers
                     (causal QKᵀ and PV, half the square), over the measured bf16 GEMM peak
"""

from __future__ import annotations

import dataclasses
import time

import torch

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams


def measure_copy_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    count = int(gib * 2**30) // 4
    source = torch.empty(count, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * count * 4 / times[len(times) // 2]


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """FLOP/s of a large square matmul on random data (median of 10)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


def _sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def decode_speed(
    engine: LLMEngine, batch_size: int, prompt_len: int, new_tokens: int, vocab_low: int = 100,
    shared_prompt: list[int] | None = None,
) -> dict:
    """Decode tokens/s of `batch_size` concurrent greedy requests (prefill excluded).

    Timed from the moment every request has its first token to the moment all are done,
    without synchronising inside the loop (which would defeat overlap scheduling), and only
    the tokens generated inside that window count: with many long prompts the first
    requests decode (and may finish) while the last still prefill. shared_prompt: every
    request gets this prompt (long_context_decode), else each a random one of prompt_len.
    """
    generator = torch.Generator().manual_seed(batch_size)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for _ in range(batch_size):
        prompt = shared_prompt or torch.randint(
            vocab_low, vocab, (prompt_len,), generator=generator).tolist()
        engine.add_request(None, prompt, params)
    generated: dict[str, int] = {}  # tokens so far, per request that has any
    decode_started = None
    stats_before = None
    tokens_before = finished_before = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            generated[output.request_id] = len(output.outputs[0].token_ids)
        if decode_started is None and len(generated) == batch_size:
            decode_started = time.perf_counter()
            stats_before = dataclasses.replace(engine.stats)
            tokens_before = sum(generated.values())
            finished_before = sum(count == new_tokens for count in generated.values())
    _sync(engine)
    seconds = time.perf_counter() - decode_started
    steps = engine.stats.num_steps - stats_before.num_steps
    window_tokens = batch_size * new_tokens - tokens_before
    return {
        "batch_size": batch_size,
        "decode_tok_s": window_tokens / seconds,
        "window_tokens": window_tokens,
        # Requests done before every request had its first token: the window then decodes
        # fewer rows than batch_size (raise the new tokens past the prefill steps).
        "finished_before_window": finished_before,
        "step_ms_mean": 1e3 * seconds / max(steps, 1),
        "cpu_ms_per_step": 1e3 * (engine.stats.host_seconds - stats_before.host_seconds) / max(steps, 1),
        "gpu_ms_per_step": 1e3 * (engine.stats.gpu_seconds - stats_before.gpu_seconds) / max(steps, 1),
    }


def long_context_decode(engine: LLMEngine, context_len: int, batch_sizes: list[int],
                        new_tokens: int = 32) -> list[dict]:
    """Decode tokens/s at each batch size with context_len-token contexts. Every request
    has the same prompt, prefilled once and then found in the prefix cache: 16 separate
    131,072-token contexts of an 8B model would need 256 GiB of KV. The decode kernel still
    reads each request's whole context (its own block table, the shared blocks), so the
    bytes per step are batch × context KV, though L2 may serve repeats of shared blocks."""
    context_len = min(context_len, engine.max_model_len - new_tokens)
    vocab = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(context_len)
    prompt = torch.randint(min(100, vocab // 2), vocab, (context_len,), generator=generator).tolist()
    engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():  # prefill once: the prefix cache keeps it
        engine.step()
    points = []
    for batch_size in batch_sizes:
        point = decode_speed(engine, batch_size, context_len, new_tokens, shared_prompt=prompt)
        point["context_len"] = context_len
        points.append(point)
    return points


def ttft_prompt_len(engine: LLMEngine, prompt_len: int) -> int:
    """The prompt length a TTFT of `prompt_len` is measured at: the engine's whole context
    less the one token the request generates, at most (131,071 prompt tokens + the first
    token fill Llama-3.1's 131,072)."""
    return min(prompt_len, engine.max_model_len - 1)


def time_to_first_token(engine: LLMEngine, prompt_len: int, repeats: int | None = None) -> float:
    """Seconds for a prompt of prompt_len to give its first token (median of repeats; by
    default 3, and 1 from 16,384 tokens, where one run takes seconds and varies little)."""
    if repeats is None:
        repeats = 3 if prompt_len < 16384 else 1
    vocab = engine.model_config.vocab_size
    times = []
    for index in range(repeats):
        generator = torch.Generator().manual_seed(1000 + index)
        prompt = torch.randint(100, vocab, (prompt_len,), generator=generator).tolist()
        engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=1))
        _sync(engine)
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        _sync(engine)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def prefill_flops(engine: LLMEngine, prompt_len: int) -> float:
    config = engine.model_config
    params = sum(p.numel() for p in engine.runner.model.parameters())
    embedding = config.vocab_size * config.hidden_size
    # The LM head runs on the last token only; the embedding is a lookup.
    matmul_params = params - embedding - (0 if config.tie_word_embeddings else embedding)
    linear = 2 * matmul_params * prompt_len + 2 * embedding
    attention = 2 * 2 * prompt_len * prompt_len / 2 * config.num_heads * config.head_dim * config.num_layers
    return linear + attention


def weight_bytes_per_token(engine: LLMEngine) -> int:
    """Weight bytes one decode step must read: every parameter except the input embedding
    table, of which a step reads one row (tied: the same matrix is read whole as the head)."""
    config = engine.model_config
    total = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    if config.tie_word_embeddings:
        return total
    element = next(engine.runner.model.parameters()).element_size()
    return total - config.vocab_size * config.hidden_size * element

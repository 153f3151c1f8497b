"""Where one step's GPU time goes: torch.profiler over prefills, a few batch-1 decode steps,
decode steps at --batch rows of --batch-prompt-len context, and (--mixed) the eager mixed
steps after new prompts arrive among decoding requests; top kernels by total CUDA time.
On sm_90 the kernels launch with PDL, so each one's time includes its wait for the kernel
before it and the rows do not add up to the step: run with KILN_PDL=0 for a breakdown that
does (the step itself is then slower by the launch gaps PDL hides).
Usage (GPU machine):
    python3 benchmarks/profile_step.py ENGINE_DIR [--prefill 512 8192] [--batch 1024
        --batch-prompt-len 192] [--mixed 900 111] [--max-num-seqs 1024
        --max-num-batched-tokens 16384] [--mixed-prompt-len 128] [--kv-cache-dtype fp8]
        [--out DIR]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kiln.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams


def run(engine: LLMEngine, prompt_len: int, max_tokens: int, batch: int = 1) -> None:
    generator = torch.Generator().manual_seed(prompt_len)
    vocab = engine.model_config.vocab_size
    for _ in range(batch):
        prompt = torch.randint(100, vocab, (prompt_len,), generator=generator).tolist()
        engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_decode_steps(engine: LLMEngine, prompt_len: int, batch: int, steps: int) -> list[dict]:
    """Kernels of `steps` decode-only steps at `batch` rows, after every prompt is prefilled."""
    budget = engine.config.max_num_batched_tokens
    prefill_steps = -(-batch * prompt_len // budget) + 3
    generator = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    for _ in range(batch):
        prompt = torch.randint(100, vocab, (prompt_len,), generator=generator).tolist()
        params = SamplingParams(temperature=1.0, max_tokens=prefill_steps + steps + 4, ignore_eos=True)
        engine.add_request(None, prompt, params)
    for _ in range(prefill_steps):
        engine.step()
    return profile_then_drain(engine, steps)[0]


def profile_then_drain(engine: LLMEngine, steps: int):
    """Profile the next `steps` steps, run the rest to completion; (kernel rows with
    us_per_step, the profile)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    rows = top_kernels(prof, 40)
    for row in rows:
        row["us_per_step"] = row["total_us"] / steps
    return rows, prof


def profile_mixed_step(engine: LLMEngine, decode_rows: int, new_prompts: int, prompt_len: int,
                       steps: int = 2) -> tuple[list[dict], list[dict]]:
    """Kernels of the steps right after `new_prompts` prompts arrive while `decode_rows`
    requests decode: the eager mixed steps of an offline run between decode waves."""
    budget = engine.config.max_num_batched_tokens
    generator = torch.Generator().manual_seed(decode_rows)
    vocab = engine.model_config.vocab_size

    def add(count: int, max_tokens: int) -> None:
        for _ in range(count):
            prompt = torch.randint(100, vocab, (prompt_len,), generator=generator).tolist()
            engine.add_request(None, prompt, SamplingParams(temperature=1.0, max_tokens=max_tokens,
                                                            ignore_eos=True))

    prefill_steps = -(-decode_rows * prompt_len // budget) + 3
    add(decode_rows, prefill_steps + steps + 8)
    for _ in range(prefill_steps):
        engine.step()
    add(new_prompts, 4)
    rows, prof = profile_then_drain(engine, steps)
    return rows, top_host_ops(prof, 15)


def top_host_ops(prof, count: int) -> list[dict]:
    rows = [
        {"name": e.key[:90], "calls": e.count, "self_cpu_us": e.self_cpu_time_total}
        for e in prof.key_averages() if e.self_cpu_time_total
    ]
    rows.sort(key=lambda r: -r["self_cpu_us"])
    return rows[:count]


def top_kernels(prof, count: int) -> list[dict]:
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"name": event.key[:90], "calls": event.count, "total_us": device_us})
    rows.sort(key=lambda r: -r["total_us"])
    return rows[:count]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--prefill", type=int, nargs="*", default=[128, 8192])
    parser.add_argument("--decode-tokens", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256, help="batch of the second decode profile")
    parser.add_argument("--batch-prompt-len", type=int, default=5,
                        help="prompt length of the batched decode profile (its KV context)")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--mixed", type=int, nargs=2, metavar=("DECODE_ROWS", "NEW_PROMPTS"),
                        help="also profile the mixed steps after NEW_PROMPTS prompts "
                             "arrive while DECODE_ROWS requests decode")
    parser.add_argument("--mixed-prompt-len", type=int, default=128,
                        help="prompt length of --mixed's requests (decoding and new)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    engine = LLMEngine.from_engine_dir(args.engine, EngineConfig(
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_dtype=args.kv_cache_dtype))
    report = {}
    for prompt_len in args.prefill:
        run(engine, prompt_len, 1)  # warm-up: compiles
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(engine, prompt_len, 1)
        report[f"prefill_{prompt_len}"] = top_kernels(prof, 15)
        report[f"prefill_{prompt_len}_host"] = top_host_ops(prof, 15)
    run(engine, 5, args.decode_tokens)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(engine, 5, args.decode_tokens)
    report["decode_bs1"] = top_kernels(prof, 25)
    run(engine, args.batch_prompt_len, 8, batch=args.batch)
    report[f"decode_bs{args.batch}_ctx{args.batch_prompt_len}"] = profile_decode_steps(
        engine, args.batch_prompt_len, args.batch, args.decode_tokens)
    if args.mixed:
        name = f"mixed_{args.mixed[0]}decode_{args.mixed[1]}x{args.mixed_prompt_len}"
        report[name], report[f"{name}_host"] = profile_mixed_step(
            engine, args.mixed[0], args.mixed[1], args.mixed_prompt_len)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_step.json").write_text(json.dumps(report, indent=1))
    for name, rows in report.items():
        key = "self_cpu_us" if name.endswith("_host") else "total_us"
        total = sum(r[key] for r in rows)
        print(f"== {name}: top {'host ops' if key == 'self_cpu_us' else 'kernels'} {total / 1e3:.2f} ms")
        for row in rows[:12]:
            print(f"  {row[key] / 1e3:8.2f} ms {row['calls']:6d}x  {row['name']}")


if __name__ == "__main__":
    main()

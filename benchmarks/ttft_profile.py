"""Where a short prompt's time to first token goes, with and without prefill CUDA graphs, on
one engine (the graphs toggled by dropping the runner's PrefillGraphRunner).

Per prompt length, median of --repeats batch-1 requests (max_tokens 1, greedy):
    ttft_ms         add_request → the finished output, as `kiln bench latency` times it
    launch_ms       host time inside runner.execute_async of the prefill step (prepare,
                    the forward's launches or the replay, the sampler's launches)
    gpu_ms          the step's device time (events around it)
    collect_ms      host time blocked in runner.collect (waiting for the device)
Then one torch.profiler trace of an eager and a graphed 128-token step: kernels launched,
their device time, and the host ops that cost most.

Usage (GPU machine): python3 benchmarks/ttft_profile.py ENGINE_DIR [--lens 16 128 512 1024]
    [--repeats 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kiln.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams


def one_request(engine: LLMEngine, prompt_len: int, seed: int) -> dict:
    runner = engine.runner
    vocab = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, vocab, (prompt_len,), generator=generator).tolist()
    launch_s = []
    original = runner.execute_async

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = original(*args, **kwargs)
        launch_s.append(time.perf_counter() - started)
        return result

    runner.execute_async = timed
    gpu_before, wait_before = runner.gpu_seconds, runner.wait_seconds
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    ttft = time.perf_counter() - started
    torch.cuda.synchronize()
    del runner.execute_async
    return {"ttft_ms": 1e3 * ttft, "launch_ms": 1e3 * max(launch_s),
            "steps": len(launch_s), "gpu_ms": 1e3 * (runner.gpu_seconds - gpu_before),
            "collect_ms": 1e3 * (runner.wait_seconds - wait_before)}


def measure(engine: LLMEngine, prompt_len: int, repeats: int) -> dict:
    one_request(engine, prompt_len, 0)  # warm-up
    runs = [one_request(engine, prompt_len, 1 + index) for index in range(repeats)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def trace(engine: LLMEngine, prompt_len: int) -> dict:
    one_request(engine, prompt_len, 0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_request(engine, prompt_len, 99)
    kernels = 0
    device_us = 0.0
    rows = []
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += event.count
            device_us += getattr(event, "device_time_total", 0) or 0
        elif event.self_cpu_time_total:
            rows.append({"name": event.key[:80], "calls": event.count,
                         "self_cpu_us": event.self_cpu_time_total})
    rows.sort(key=lambda r: -r["self_cpu_us"])
    return {"device_events": kernels, "device_us": device_us, "top_host_ops": rows[:20]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--lens", type=int, nargs="*", default=[16, 128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    engine = LLMEngine.from_engine_dir(args.engine, EngineConfig(max_model_len=16384))
    print(engine.startup.describe())
    graphs = engine.runner.prefill_graphs
    report = {"startup": engine.startup.describe(), "graphed": {}, "eager": {}}
    for mode in ("graphed", "eager"):
        engine.runner.prefill_graphs = graphs if mode == "graphed" else None
        for prompt_len in args.lens:
            report[mode][prompt_len] = row = measure(engine, prompt_len, args.repeats)
            print(f"{mode:8s} {prompt_len:6d} tokens: TTFT {row['ttft_ms']:6.2f} ms, launch "
                  f"{row['launch_ms']:6.2f} ms, GPU {row['gpu_ms']:6.2f} ms, collect wait "
                  f"{row['collect_ms']:6.2f} ms, {row['steps']} steps")
        report[f"trace_128_{mode}"] = info = trace(engine, 128)
        print(f"{mode} 128-token trace: {info['device_events']} device events, "
              f"{info['device_us'] / 1e3:.2f} ms device; top host ops: "
              + "; ".join(f"{r['name']} {r['self_cpu_us'] / 1e3:.2f} ms x{r['calls']}"
                          for r in info["top_host_ops"][:6]))
    engine.runner.prefill_graphs = graphs
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ttft_profile.json").write_text(json.dumps(report, indent=1))
    engine.close()


if __name__ == "__main__":
    main()

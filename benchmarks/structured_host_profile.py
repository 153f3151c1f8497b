"""Where a structured decode step's host time goes (issue 14: JSON at batch 64 must keep
≥ 0.90x of unconstrained tok/s; at batch 64 the step is host-bound when the grammar's host
work does not fit inside the GPU's forward).

One engine, the same 64 random prompts twice: unconstrained, then every request constrained
to the throughput bench's JSON schema; each run's decode steps under cProfile. Prints the
top functions by own time for both, and the step time, host time (step minus the waits for
the device) and GPU time per step.

    python -P benchmarks/structured_host_profile.py ENGINE --tokenizer DIR [--batch 64]
        [--steps 120] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import time
from pathlib import Path

import torch

from kiln import LLM, SamplingParams
from kiln.bench.results import device_name
from kiln.bench.throughput import BENCH_SCHEMA, grammar_tokenizer
from kiln.structured.params import StructuredOutputsParams


def profile_run(engine, batch: int, prompt_len: int, steps: int, structured: bool,
                top: int) -> dict:
    rng = random.Random(0)
    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer))
    constraint = StructuredOutputsParams(json=BENCH_SCHEMA) if structured else None
    params = SamplingParams(temperature=1.0, max_tokens=steps + 20, ignore_eos=True,
                            structured_outputs=constraint)
    if structured:
        engine.compile_structured_outputs(params)
    for _ in range(batch):
        engine.add_request(None, {"prompt_token_ids": [rng.randrange(100, vocab)
                                                       for _ in range(prompt_len)]}, params)
    for _ in range(8):  # the prefills and the first decode steps
        engine.step()
    stats = engine.stats
    before = (stats.num_steps, stats.step_seconds, stats.wait_seconds, stats.gpu_seconds)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    profiler.disable()
    wall = time.perf_counter() - started
    after = (stats.num_steps, stats.step_seconds, stats.wait_seconds, stats.gpu_seconds)
    while engine.has_unfinished_requests():
        engine.step()
    num_steps = after[0] - before[0]
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    per_step = 1e3 / max(num_steps, 1)
    return {
        "structured": structured, "steps": num_steps, "wall_ms_per_step": wall * per_step,
        "step_ms": (after[1] - before[1]) * per_step,
        "host_ms": (after[1] - before[1] - after[2] + before[2]) * per_step,
        "gpu_ms": (after[3] - before[3]) * per_step,
        "profile": text.getvalue(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = {"device": args.device} if args.device else {}
    runs = []
    with LLM(model=args.model, **device) as llm:
        engine = llm.llm_engine
        if engine.tokenizer is None:
            engine.tokenizer = grammar_tokenizer(args.tokenizer, engine.model_config.vocab_size)
        for structured in (False, True):
            runs.append(profile_run(engine, args.batch, args.prompt_len, args.steps, structured,
                                    args.top))
        if engine._structured is not None:
            manager = engine._structured
            grammar = {"mask_ms_per_mask": 1e3 * manager.mask_seconds / max(manager.num_masks, 1),
                       "num_masks": manager.num_masks}
    for run in runs:
        print(f"\n==== {'structured' if run['structured'] else 'unconstrained'}: "
              f"{run['steps']} steps, wall {run['wall_ms_per_step']:.2f} (profiled) · step "
              f"{run['step_ms']:.2f} · host {run['host_ms']:.2f} · GPU {run['gpu_ms']:.2f} ms/step")
        print(run["profile"])
    print("grammar:", grammar)
    result = {"benchmark": "structured_host_profile", "gpu": device_name(engine.device),
              "torch_version": torch.__version__,
              "config": vars(args) | {"out": str(args.out)}, "runs": runs, "grammar": grammar}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"structured-host-profile-{time.strftime('%Y%m%d-%H%M%S')}-{engine.device.type}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

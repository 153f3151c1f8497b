"""Does a new schema arriving mid-run stall the running streams? (issue 14: "grammar compile
time ... never on the step loop (ITL p99 unchanged when a new schema arrives mid-run)").

Three runs of the same unconstrained decoding streams on one engine: alone; with a request
carrying an already compiled 50-field JSON schema (a cache hit) added every
`--interval-steps` steps; and with a request carrying a fresh one (a cache miss: a compile)
at the same steps. Each step of the streams is one inter-token interval for every stream, so
the step wall times are the ITLs. An arriving request costs its streams a mixed step (its
prompt's prefill) and a constrained row whatever its schema, so what a compile adds is the
cache-miss run against the cache-hit run (`p99_ratio`). The grammar engine and the
constrained sampling path are warmed first (the vocabulary's preprocessing, one structured
request run to its end), as in a server that has served one structured request.

    python benchmarks/structured_itl.py ENGINE [--tokenizer DIR] [--streams 32]
        [--steps 300] [--new-schemas 10] [--interval-steps 25] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from kiln import LLM, SamplingParams
from kiln.bench.results import device_name
from kiln.bench.throughput import fifty_field_schema, grammar_tokenizer
from kiln.structured.params import StructuredOutputsParams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def run(engine, streams: int, steps: int, prompt_len: int, arrivals: int, interval: int,
        seed: int, fresh_schemas: bool) -> dict:
    rng = random.Random(seed)
    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer))
    stream_params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for _ in range(streams):
        prompt = [rng.randrange(100, vocab) for _ in range(prompt_len)]
        engine.add_request(None, {"prompt_token_ids": prompt}, stream_params)
    # Warm-up: the streams' prefills and the first decode steps are not ITLs.
    for _ in range(5):
        engine.step()
    step_ms, injected, step = [], 0, 0
    while engine.has_unfinished_requests() and step < steps - 10:
        if arrivals and step % interval == 0 and injected < arrivals:
            name = f"mid{seed}_{injected}_{time.time_ns()}" if fresh_schemas else "warm"
            schema = fifty_field_schema(name)
            prompt = [rng.randrange(100, vocab) for _ in range(prompt_len)]
            engine.add_request(None, {"prompt_token_ids": prompt}, SamplingParams(
                temperature=0, max_tokens=8,
                structured_outputs=StructuredOutputsParams(json=schema)))
            injected += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        engine.step()
        step_ms.append(1e3 * (time.perf_counter() - started))
        step += 1
    while engine.has_unfinished_requests():
        engine.step()
    return {"steps": len(step_ms), "arrivals": injected, "fresh_schemas": fresh_schemas,
            "step_ms_p50": statistics.median(step_ms), "step_ms_p99": percentile(step_ms, 99),
            "step_ms_max": max(step_ms), "step_ms_mean": statistics.fmean(step_ms)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer for an engine without one (directory, 'smollm2', ...)")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-schemas", type=int, default=10)
    parser.add_argument("--interval-steps", type=int, default=25)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    device = {"device": args.device} if args.device else {}
    with LLM(model=args.model, **device) as llm:
        engine = llm.llm_engine
        if engine.tokenizer is None:
            if not args.tokenizer:
                raise SystemExit("this engine has no tokenizer: pass --tokenizer")
            engine.tokenizer = grammar_tokenizer(args.tokenizer, engine.model_config.vocab_size)
        compiler = engine.structured_outputs().compiler
        warm = StructuredOutputsParams(json=fifty_field_schema("warm"))
        started = time.perf_counter()
        compiler.compile_blocking(warm)
        warm_ms = 1e3 * (time.perf_counter() - started)
        engine.add_request(None, {"prompt_token_ids": [100] * args.prompt_len},
                           SamplingParams(temperature=0, max_tokens=8, structured_outputs=warm))
        while engine.has_unfinished_requests():
            engine.step()
        shape = (args.streams, args.steps, args.prompt_len)
        alone = run(engine, *shape, 0, args.interval_steps, seed=1, fresh_schemas=False)
        known = run(engine, *shape, args.new_schemas, args.interval_steps, seed=2,
                    fresh_schemas=False)
        with_schemas = run(engine, *shape, args.new_schemas, args.interval_steps, seed=3,
                           fresh_schemas=True)
    result = {"benchmark": "structured_itl", "gpu": device_name(engine.device),
              "torch_version": torch.__version__, "config": vars(args) | {"out": str(args.out)},
              "first_compile_ms": warm_ms, "alone": alone, "with_known_schema": known,
              "with_new_schemas": with_schemas,
              "p99_ratio": with_schemas["step_ms_p99"] / known["step_ms_p99"],
              "p99_ratio_to_alone": with_schemas["step_ms_p99"] / alone["step_ms_p99"]}
    for name in ("alone", "with_known_schema", "with_new_schemas"):
        row = result[name]
        print(f"{name:18s} steps {row['steps']:4d}  ITL p50 {row['step_ms_p50']:7.2f} ms  "
              f"p99 {row['step_ms_p99']:7.2f} ms  max {row['step_ms_max']:7.2f} ms")
    print(f"p99 with new schemas / with a known schema: {result['p99_ratio']:.2f} "
          f"(/ alone: {result['p99_ratio_to_alone']:.2f})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"structured-itl-{time.strftime('%Y%m%d-%H%M%S')}-{engine.device.type}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

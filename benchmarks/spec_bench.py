"""Speculative-decoding figures on one GPU, one engine load (benchmarks/spec_run.sh):

    aligned   batch 1, greedy: plain decode (overlapped, and synchronous: the cost of the
              fallback speculative steps take), then the aligned draft at k = 1..8
              (adaptive k off): tok/s, speedup, GPU ms per target step (the 1 + k verify)
    random    batch 64: plain vs the random-token proposer (acceptance ~0) with adaptive k,
              and without it (what adaptive k saves)

    python benchmarks/spec_bench.py TARGET DRAFT --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from kiln.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from kiln.spec.adaptive import AdaptiveK
from kiln.spec.random_proposer import RandomProposer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(engine, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for index in range(batch):
        engine.add_request(f"bench-{index:04d}",
                           {"prompt_token_ids": [rng.randrange(vocab) for _ in range(prompt_len)]},
                           params)
    # Prefill first, so the timing below is decode only.
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running_requests) or \
            engine.scheduler.num_waiting:
        engine.step()
    steps, gpu = engine.stats.num_steps, engine.stats.gpu_seconds
    spec = engine.speculator
    proposed = spec.stats.num_proposed_tokens if spec else 0
    accepted = spec.stats.num_accepted_tokens if spec else 0
    produced_before = sum(r.num_output_tokens for r in engine.scheduler.running_requests)
    _sync()
    started = time.perf_counter()
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0].token_ids
    _sync()
    seconds = time.perf_counter() - started
    num_steps = engine.stats.num_steps - steps
    tokens = batch * new_tokens - produced_before
    result = {"batch": batch, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
              "steps": num_steps, "ms_per_step": 1e3 * seconds / max(num_steps, 1),
              "gpu_ms_per_step": 1e3 * (engine.stats.gpu_seconds - gpu) / max(num_steps, 1),
              "_tokens": [outputs[key] for key in sorted(outputs)]}
    if spec is not None:
        p = spec.stats.num_proposed_tokens - proposed
        a = spec.stats.num_accepted_tokens - accepted
        result.update(proposed=p, accepted=a, acceptance_rate=a / p if p else 0.0)
    return result


def set_mode(engine, speculator, k: int | None, adaptive: bool = False, overlap: bool = True):
    engine.overlap_scheduling = overlap
    if k is None:
        engine.speculator = None
        return
    engine.speculator = speculator
    speculator.adaptive = AdaptiveK(k, enabled=adaptive, ridge_tokens=speculator.config.ridge_tokens,
                                    proposer_cost=speculator.adaptive.proposer_cost)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--cpu", action="store_true", help="a dry run on tiny engines")
    args = parser.parse_args()
    knobs = {"device": "cpu", "num_kv_blocks": 2048, "max_model_len": 128} if args.cpu else {
        "max_model_len": 2048}
    config = EngineConfig(verify_hashes=False, **knobs)
    started = time.perf_counter()
    engine = LLMEngine.from_engine_dir(args.target, config, {
        "method": "draft", "model": args.draft, "num_speculative_tokens": 8, "adaptive": False})
    print(f"target + draft loaded in {time.perf_counter() - started:.1f} s; "
          f"{engine.startup.describe()}", flush=True)
    speculator = engine.speculator
    draft_proposer = speculator.proposer
    results = {"gpu": torch.cuda.get_device_name() if not args.cpu else "cpu", "aligned": {}, "random_batch64": {}}
    out = args.out / "spec_h200.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    # Warm-ups: Triton specialisations of the eager verify shapes, both engines' graphs.
    for k in (None, 4):
        set_mode(engine, speculator, k)
        run(engine, 1, 32, 8)
    aligned = results["aligned"]
    set_mode(engine, speculator, None)
    aligned["off"] = run(engine, 1, 32, args.new_tokens)
    set_mode(engine, speculator, None, overlap=False)
    aligned["off_synchronous"] = run(engine, 1, 32, args.new_tokens)
    aligned["off_synchronous"].pop("_tokens")
    print(f"bs1 off {aligned['off']['tok_s']:.1f} tok/s (gpu {aligned['off']['gpu_ms_per_step']:.2f} "
          f"ms/step); synchronous {aligned['off_synchronous']['tok_s']:.1f}", flush=True)
    for k in args.ks:
        set_mode(engine, speculator, k)
        point = run(engine, 1, 32, args.new_tokens)
        point["speedup"] = point["tok_s"] / aligned["off"]["tok_s"]
        point["tokens_identical_to_off"] = point.pop("_tokens") == aligned["off"]["_tokens"]
        point["verify_gpu_over_plain"] = point["gpu_ms_per_step"] / max(
            aligned["off"]["gpu_ms_per_step"], 1e-9)
        aligned[f"k{k}"] = point
        print(f"k={k}: {point['tok_s']:.1f} tok/s = {point['speedup']:.2f}x, acceptance "
              f"{point['acceptance_rate']:.2f}, target gpu {point['gpu_ms_per_step']:.2f} ms/step "
              f"({point['verify_gpu_over_plain']:.2f}x plain), {point['ms_per_step']:.2f} ms/step, "
              f"identical {point['tokens_identical_to_off']}",
              flush=True)
        save()

    batch64 = results["random_batch64"]
    speculator.proposer = RandomProposer(engine.model_config.vocab_size)
    set_mode(engine, speculator, None)
    set_mode(engine, speculator, 4)
    run(engine, 64, 32, 4)  # warm-up: the 64 x 5-row verify graph's first replay
    set_mode(engine, speculator, None)
    batch64["off"] = run(engine, 64, 32, args.batch_tokens)
    for name, adaptive in (("random_adaptive", True), ("random_fixed_k4", False)):
        set_mode(engine, speculator, 4, adaptive=adaptive)
        point = run(engine, 64, 32, args.batch_tokens)
        point["ratio_to_off"] = point["tok_s"] / batch64["off"]["tok_s"]
        point["tokens_identical_to_off"] = point.pop("_tokens") == batch64["off"]["_tokens"]
        batch64[name] = point
        print(f"bs64 {name}: {point['tok_s']:.0f} tok/s = {point['ratio_to_off']:.2f}x of off "
              f"({batch64['off']['tok_s']:.0f})", flush=True)
        save()
    aligned["off"].pop("_tokens")
    batch64["off"].pop("_tokens")
    speculator.proposer = draft_proposer
    engine.speculator = speculator
    engine.close()
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

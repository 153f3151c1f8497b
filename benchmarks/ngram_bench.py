"""n-gram (prompt lookup) speculative decoding on a real model at batch 1, temperature 0:
the issue-12 target on SmolLM2 — copy-heavy prompts ≥ 1.8× with identical outputs, ShareGPT
prompts no slowdown (≥ 0.97×). Each prompt runs alone (batch 1) through the plain engine and
the speculative one; tok/s is output tokens over the summed wall time of the set.

    python benchmarks/ngram_bench.py ENGINE_OR_GGUF [--prompts benchmarks/data/ngram_prompts.json]
        [--k 4] [--no-adaptive] [--copy-tokens 256] [--sharegpt-tokens 128] [--out DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from kiln import LLM, SamplingParams
from kiln.bench.results import device_name


def run_set(llm: LLM, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    llm.chat(conversations[:2], params, use_tqdm=False)  # warm-up (graphs, compiles)
    outputs, seconds = [], 0.0
    for conversation in conversations:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = llm.chat(conversation, params, use_tqdm=False)[0]
        seconds += time.perf_counter() - start
        outputs.append(list(result.outputs[0].token_ids))
    return outputs, seconds


def first_divergences(plain: list[list[int]], spec: list[list[int]]) -> list[tuple[int, int]]:
    """(prompt index, first differing position) of each pair of outputs that differ."""
    found = []
    for index, (a, b) in enumerate(zip(plain, spec)):
        if a != b:
            position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            found.append((index, position))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompts", type=Path,
                        default=Path(__file__).parent / "data" / "ngram_prompts.json")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=1)
    parser.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                        help="propose k tokens every step (default: adaptive k, the engine's default)")
    parser.add_argument("--copy-tokens", type=int, default=256)
    parser.add_argument("--sharegpt-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the engine's)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="KILN_BATCH_INVARIANT=1 for both engines (kiln/kernels/triton_utils.py)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.batch_invariant:
        os.environ["KILN_BATCH_INVARIANT"] = "1"

    sets = json.loads(args.prompts.read_text())
    budgets = {"copy": args.copy_tokens, "sharegpt": args.sharegpt_tokens}
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "ngram_max": args.ngram_max,
            "ngram_min": args.ngram_min, "adaptive": args.adaptive}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"benchmark": "ngram", "gpu": device_name(device),
                     "torch_version": torch.__version__,
                     "config": {**spec, **budgets, "model": str(args.model),
                                "dtype": args.dtype or "engine",
                                "batch_invariant": args.batch_invariant}}
    runs: dict = {}
    dtype = {"dtype": args.dtype} if args.dtype else {}
    for mode, config in (("plain", None), ("ngram", spec)):
        with LLM(model=args.model, speculative_config=config, **dtype) as llm:
            for name, prompts in sets.items():
                prompts = prompts[: args.limit]
                speculator = getattr(llm.llm_engine, "speculator", None)
                before = speculator.stats.as_dict() if speculator else None
                runs[(mode, name)] = run_set(llm, prompts, budgets[name])
                if speculator is not None:  # the counts are cumulative: this set's share
                    after = speculator.stats.as_dict()
                    delta = {key: after[key] - before[key] for key in
                             ("num_verify_rows", "num_proposed_tokens", "num_accepted_tokens")}
                    delta["acceptance_rate"] = (delta["num_accepted_tokens"]
                                                / max(delta["num_proposed_tokens"], 1))
                    delta["mean_accepted_length"] = 1 + (delta["num_accepted_tokens"]
                                                         / max(delta["num_verify_rows"], 1))
                    results.setdefault("acceptance", {})[name] = delta
    divergences = {name: first_divergences(runs[("plain", name)][0], runs[("ngram", name)][0])
                   for name in sets}
    # The plain engine again (untimed): the top-2 log-probability gap where each differing
    # output first differs. bf16 logits have ~3 significant digits; a gap within their
    # rounding means a GEMV (plain step) and a 5-row GEMM (verify) may rank the two apart.
    with LLM(model=args.model, **dtype) as llm:
        for name, found in divergences.items():
            prompts = sets[name][: args.limit]
            gaps = []
            for index, position in found:
                params = SamplingParams(temperature=0, max_tokens=position + 1, logprobs=2)
                result = llm.chat([{"role": "user", "content": prompts[index]}], params,
                                  use_tqdm=False)[0]
                top = result.outputs[0].logprobs[position].top
                gaps.append(top[0][1] - top[1][1] if len(top) > 1 else None)
            results.setdefault("divergence", {})[name] = {
                "prompts": [index for index, _ in found],
                "first_position": [position for _, position in found],
                "top2_logprob_gap": gaps,
            }
    for name in sets:
        (plain_out, plain_s), (spec_out, spec_s) = runs[("plain", name)], runs[("ngram", name)]
        tokens = sum(map(len, plain_out))
        identical = sum(a == b for a, b in zip(plain_out, spec_out))
        results[name] = {
            "prompts": len(plain_out), "output_tokens": tokens,
            "plain_tok_s": tokens / plain_s, "ngram_tok_s": sum(map(len, spec_out)) / spec_s,
            "speedup": plain_s / spec_s * sum(map(len, spec_out)) / max(tokens, 1),
            "identical_outputs": identical,
        }
        print(f"{name:9s} {len(plain_out):4d} prompts {tokens:7d} tokens  plain "
              f"{results[name]['plain_tok_s']:8.1f} tok/s  ngram {results[name]['ngram_tok_s']:8.1f}"
              f" tok/s  ×{results[name]['speedup']:.2f}  identical {identical}/{len(plain_out)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ngram_bench{'-batch-invariant' if args.batch_invariant else ''}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Quality of several quantised builds against one reference, on the same held-out tokens:
`kiln eval ENGINE --compare REFERENCE` for each, with the reference's forward run once per
window instead of once per engine (kiln/evaluate/perplexity.py evaluate_many — the code
path `kiln eval` itself runs). Writes one JSON per engine in `kiln eval --output-json`'s
shape, plus a summary with the machine, dtype and settings.

    python benchmarks/quant_quality.py --reference /tmp/e/bf16 \
        --engine fp8=/tmp/e/fp8 --engine int8-wo=/tmp/e/int8 --num-tokens 50000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kiln.checkpoint.tokenizer import load_tokenizer
from kiln.evaluate.corpus import SHAREGPT, documents, token_stream
from kiln.evaluate.forward import TeacherForcedModel
from kiln.evaluate.perplexity import evaluate_many, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--engine", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--num-tokens", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--skip-tokens", type=int, default=0,
                        help="start after this many tokens of the stream (to extend an earlier "
                        "run: its windows used num_tokens + num_windows tokens)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tag", default="smollm2")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args()

    started = time.time()
    reference = TeacherForcedModel(args.reference, device=args.device, max_window=args.window)
    engines = {}
    for item in args.engine:
        name, _, directory = item.partition("=")
        engines[name] = TeacherForcedModel(directory, device=args.device, max_window=args.window)
    tokenizer = load_tokenizer(reference.engine.tokenizer_dir)
    wanted = args.skip_tokens + args.num_tokens + 1
    token_ids = token_stream(tokenizer, documents(SHAREGPT, "evaluation"), wanted)[args.skip_tokens:]
    results = evaluate_many(reference, engines, token_ids, window=args.window,
                            num_tokens=args.num_tokens)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M")
    summary = {
        "what": "kiln eval --compare of quantised builds against the reference build",
        "reference": str(args.reference), "device": str(reference.device),
        "compute_dtype": str(reference.dtype), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "window": args.window, "skip_tokens": args.skip_tokens, "text": "ShareGPT held-out replies "
        "(odd-indexed conversations; calibration uses the even ones)",
        "seconds": round(time.time() - started, 1), "engines": {},
    }
    for name, result in results.items():
        if name == "reference":
            continue
        engine = engines[name].engine
        payload = result.to_json()
        path = output_dir / f"quant-quality-{args.tag}-{name}-{stamp}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        summary["engines"][name] = {"engine": str(engine.path), "quant": engine.manifest["quant"],
                                    "kv_cache_dtype": str(engines[name].kv_cache_dtype),
                                    "build": {k: engine.manifest["build"].get(k) for k in
                                              ("dtype", "kv_cache_dtype", "calibration",
                                               "calibration_samples")},
                                    **payload}
        print(f"\n== {name}\n{format_table(result, name, 'reference')}")
    summary_path = output_dir / f"quant-quality-{args.tag}-summary-{stamp}.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {summary_path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""kiln build | inspect | generate | chat.

User errors (KilnError, ValueError from validation) print one line and exit 1, with no
traceback; anything else is a kiln bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.bench.cli import add_bench_parsers
from kiln.cli_common import add_engine_args, engine_kwargs
from kiln.errors import KilnError
from kiln.evaluate.cli import add_eval_parsers
from kiln.serve.cli import add_serve_parser

EXIT_USER_ERROR = 1


def cmd_build(args: argparse.Namespace) -> None:
    from kiln.compiler.builder import build_engine
    from kiln.compiler.presets import PRESETS, get_preset
    from kiln.config import BuildConfig, validated

    config = validated(
        BuildConfig, dtype=args.dtype, max_model_len=args.max_model_len,
        random_weights=args.random_weights, seed=args.seed, quant=args.quant,
        group_size=args.group_size, act_scales=args.act_scales, quant_lm_head=args.quant_lm_head,
        kv_cache_dtype=args.kv_cache_dtype, calibration=args.calibration,
        calibration_samples=args.calibration_samples,
    )
    hf_config = None
    if args.random_weights and args.source in PRESETS:
        hf_config = get_preset(args.source)
    elif args.random_weights and not Path(args.source).exists():
        get_preset(args.source)  # raises with the list of presets
    summary = build_engine(args.source, args.output, config, hf_config=hf_config, force=args.force)
    print(summary.describe())


def cmd_inspect(args: argparse.Namespace) -> None:
    from kiln.compiler.manifest import open_engine

    engine = open_engine(args.engine, verify_hashes=True)
    m, c = engine.manifest, engine.model_config
    print(f"engine      {engine.path}")
    print(f"format      {m['format']} v{m['format_version']} (kiln {m['kiln_version']})")
    print(f"model       {c.architecture}: {c.num_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_heads} heads / {c.num_kv_heads} KV heads, vocab {c.vocab_size}")
    print(f"build       dtype {m['build']['dtype']}, max_model_len {m['build']['max_model_len']}, "
          f"quant {m['quant']['scheme']}, tp {m['parallel']['tp']} pp {m['parallel']['pp']}")
    quant = {k: v for k, v in m["quant"].items() if k != "scheme" and v not in (None, [], False)}
    if quant or m["build"].get("kv_cache_dtype", "auto") != "auto":
        details = ", ".join(f"{k} {v}" for k, v in quant.items())
        kv = m["build"].get("kv_cache_dtype", "auto")
        scales = m["build"].get("kv_scales")
        kv_note = f"KV cache {kv}" + (
            "" if kv == "auto" else (" (calibrated scales)" if scales and scales.get("calibrated")
                                     else " (scales 1.0, uncalibrated)"))
        print(f"quant       {m['quant']['scheme']}: {details or 'defaults'}; {kv_note}")
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"files       {len(m['files'])} files, {total / 2**20:.1f} MiB, all sha256 verified")
    print(f"source      {m['source']['path']}")


def _sampling_params(args: argparse.Namespace):
    from kiln.runtime.sampling_params import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from kiln.entrypoints import LLM

    llm = LLM(model=args.model, **engine_kwargs(args))
    params = _sampling_params(args)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params,
                           use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for output in outputs:
        print(output.outputs[0].text)


def cmd_chat(args: argparse.Namespace) -> None:
    from kiln.entrypoints import LLM, interactive_chat

    interactive_chat(LLM(model=args.model, **engine_kwargs(args)), _sampling_params(args))


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--seed", type=int, default=None)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a checkpoint into an engine")
    build.add_argument("source", help="HF model directory, .gguf file, or (with --random-weights) "
                       "an HF config.json or a preset name")
    build.add_argument("-o", "--output", required=True, help="engine directory to write")
    build.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    build.add_argument("--max-model-len", type=int, default=None)
    build.add_argument("--random-weights", action="store_true",
                       help="random weights at the source's shapes (benchmark engines)")
    build.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    build.add_argument("--quant", default="none", metavar="SCHEME",
                       help="quantisation scheme of the weights: none (the --dtype weights), "
                       "fp8, int8-wo, int4-wo, keep (a quantised checkpoint's own)")
    # Quantisation options (kiln/quant/; README "Quantization").
    build.add_argument("--group-size", type=int, default=None,
                       help="int8-wo/int4-wo inputs per scale (-1: per channel; int4 default 128)")
    build.add_argument("--act-scales", choices=("dynamic", "static"), default=None,
                       help="fp8 activation scales: per token (dynamic) or calibrated (static)")
    build.add_argument("--quant-lm-head", action="store_true", help="quantise the LM head too")
    build.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                       help="engine's default KV cache dtype (fp8: E4M3, per-layer scales)")
    build.add_argument("--calibration", default=None, metavar="sharegpt|FILE",
                       help="calibration data for static/KV/AWQ scales")
    build.add_argument("--calibration-samples", type=int, default=None, metavar="N")
    build.add_argument("--force", action="store_true", help="replace an existing output")
    build.set_defaults(func=cmd_build)

    inspect = commands.add_parser("inspect", help="summarise an engine and verify its files")
    inspect.add_argument("engine")
    inspect.set_defaults(func=cmd_inspect)

    for name, func, text in (("generate", cmd_generate, "answer prompts"),
                             ("chat", cmd_chat, "interactive streaming chat")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("model", nargs="?", default="smollm2",
                         help="engine dir, HF dir, .gguf, or 'smollm2' (the embedded default)")
        if name == "generate":
            sub.add_argument("--prompt", action="append", required=True, help="repeatable")
            sub.add_argument("--chat", action="store_true", help="apply the chat template")
        _add_sampling_args(sub)
        add_engine_args(sub)
        sub.set_defaults(func=func)
    bench = commands.add_parser("bench", help="benchmarks (JSON to benchmarks/results/)")
    add_bench_parsers(bench.add_subparsers(dest="bench", required=True), add_engine_args)
    add_serve_parser(commands)
    add_eval_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except (KilnError, ValueError) as error:
        print(f"kiln: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

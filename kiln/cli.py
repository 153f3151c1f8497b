"""kiln build | inspect | generate | chat.

User errors (KilnError, ValueError from validation) print one line and exit 1, with no
traceback; anything else is a kiln bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.errors import KilnError

EXIT_USER_ERROR = 1


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    group.add_argument("--max-num-seqs", type=int, default=None, help="most requests per step")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    group.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size, overrides memory sizing")
    group.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="disable reuse of cached prompt prefixes")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                       help="fraction of GPU memory for weights + KV cache")
    group.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    names = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
             "num_kv_blocks", "enable_prefix_caching", "gpu_memory_utilization", "device")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_build(args: argparse.Namespace) -> None:
    from kiln.build.builder import build_engine
    from kiln.build.presets import PRESETS, get_preset
    from kiln.config import BuildConfig, validated

    config = validated(
        BuildConfig, dtype=args.dtype, max_model_len=args.max_model_len,
        random_weights=args.random_weights, seed=args.seed,
    )
    hf_config = None
    if args.random_weights and args.source in PRESETS:
        hf_config = get_preset(args.source)
    elif args.random_weights and not Path(args.source).exists():
        get_preset(args.source)  # raises with the list of presets
    summary = build_engine(args.source, args.output, config, hf_config=hf_config, force=args.force)
    print(summary.describe())


def cmd_inspect(args: argparse.Namespace) -> None:
    from kiln.build.engine import open_engine

    engine = open_engine(args.engine, verify_hashes=True)
    m, c = engine.manifest, engine.model_config
    print(f"engine      {engine.path}")
    print(f"format      {m['format']} v{m['format_version']} (kiln {m['kiln_version']})")
    print(f"model       {c.architecture}: {c.num_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_heads} heads / {c.num_kv_heads} KV heads, vocab {c.vocab_size}")
    print(f"build       dtype {m['build']['dtype']}, max_model_len {m['build']['max_model_len']}, "
          f"quant {m['quant']['scheme']}, tp {m['parallel']['tp']} pp {m['parallel']['pp']}")
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

    llm = LLM(model=args.model, **_engine_kwargs(args))
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

    interactive_chat(LLM(model=args.model, **_engine_kwargs(args)), _sampling_params(args))


def cmd_bench_throughput(args: argparse.Namespace) -> None:
    from kiln.bench.datasets import sample_sharegpt, synthetic_requests
    from kiln.bench.results import write_result
    from kiln.bench.throughput import length_stats, run_batched, run_sequential
    from kiln.entrypoints import LLM

    llm = LLM(model=args.model, **_engine_kwargs(args))
    engine = llm.llm_engine
    if args.dataset == "sharegpt":
        if llm.tokenizer is None:
            raise KilnError("--dataset sharegpt needs an engine with a tokenizer; use --dataset random")
        requests = sample_sharegpt(llm.tokenizer, args.num_prompts, engine.max_model_len, args.seed)
    else:
        requests = synthetic_requests(
            args.num_prompts, args.input_len, args.output_len, engine.model_config.vocab_size, args.seed
        )
    metrics = {f"batched_{k}": v for k, v in run_batched(engine, requests).items()}
    metrics["output_tok_s"] = metrics["batched_output_tok_s"]
    metrics["requests_s"] = metrics["batched_requests_s"]
    if args.sequential_baseline:
        metrics.update({f"sequential_{k}": v for k, v in run_sequential(engine, requests).items()})
        metrics["batched_over_sequential"] = metrics["output_tok_s"] / metrics["sequential_output_tok_s"]
    config = {
        "dataset": args.dataset, **length_stats(requests), "seed": args.seed,
        "input_len": args.input_len if args.dataset == "random" else None,
        "output_len": args.output_len if args.dataset == "random" else None,
        "engine": engine.config.model_dump(), "num_kv_blocks": engine.scheduler.config.num_kv_blocks,
    }
    path = write_result(
        "throughput", device=engine.device, model=str(args.model),
        dtype=engine.engine.manifest["build"]["dtype"], config=config, metrics=metrics,
        output_dir=args.output_dir,
    )
    for name, value in metrics.items():
        print(f"{name:36s} {value:12.2f}")
    print(f"wrote {path}")


def cmd_bench_latency(args: argparse.Namespace) -> None:
    import torch

    from kiln.bench import latency
    from kiln.bench.results import write_result
    from kiln.entrypoints import LLM

    metrics: dict = {}
    if args.hf_peer:
        # First, so its memory is free again before kiln sizes its KV cache.
        from kiln.bench.peers import hf_static_cache_decode
        from kiln.build.engine import open_engine
        from kiln.entrypoints import resolve_engine

        info = open_engine(resolve_engine(args.model), verify_hashes=False)
        metrics.update(hf_static_cache_decode(
            info.model_config, torch.device("cuda"), info.dtype, args.prompt_len, args.new_tokens
        ))
    llm = LLM(model=args.model, **_engine_kwargs(args))
    engine = llm.llm_engine
    cuda = engine.device.type == "cuda"
    config = {
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "ttft_prompt_lens": args.ttft_lens, "batch_sizes": args.batch_sizes,
        "engine": engine.config.model_dump(), "num_kv_blocks": engine.scheduler.config.num_kv_blocks,
    }
    if engine.runner.capture_report is not None:
        metrics["graph_capture_s"] = engine.runner.capture_report.seconds
        metrics["graph_memory_mib"] = engine.runner.capture_report.memory_bytes / 2**20
    if cuda:
        metrics["copy_bandwidth_gb_s"] = latency.measure_copy_bandwidth(engine.device) / 1e9
        metrics["bf16_matmul_tflop_s"] = latency.measure_matmul_peak(engine.device, torch.bfloat16) / 1e12
    latency.decode_speed(engine, 1, args.prompt_len, 16)  # warm-up
    bs1 = latency.decode_speed(engine, 1, args.prompt_len, args.new_tokens)
    metrics["bs1_decode_tok_s"] = bs1["decode_tok_s"]
    metrics["bs1_step_ms_median"] = bs1["step_ms_median"]
    weight_bytes = latency.weight_bytes(engine)
    metrics["weight_gb"] = weight_bytes / 1e9
    if cuda:
        bytes_per_s = weight_bytes * bs1["decode_tok_s"]
        metrics["bs1_pct_of_copy_bandwidth"] = 100 * bytes_per_s / (metrics["copy_bandwidth_gb_s"] * 1e9)
        metrics["bs1_roofline_tok_s"] = metrics["copy_bandwidth_gb_s"] * 1e9 / weight_bytes
    for prompt_len in args.ttft_lens:
        if prompt_len + 1 > engine.max_model_len:
            continue
        seconds = latency.time_to_first_token(engine, prompt_len)
        metrics[f"ttft_ms_{prompt_len}"] = seconds * 1e3
        metrics[f"prefill_tflop_s_{prompt_len}"] = latency.prefill_flops(engine, prompt_len) / seconds / 1e12
    curve = []
    for batch_size in args.batch_sizes:
        if batch_size > engine.config.max_num_seqs:
            continue
        point = latency.decode_speed(engine, batch_size, args.prompt_len, args.batch_new_tokens)
        curve.append(point)
        metrics[f"decode_tok_s_bs{batch_size}"] = point["decode_tok_s"]
    path = write_result(
        "latency", device=engine.device, model=str(args.model),
        dtype=str(engine.dtype).removeprefix("torch."), config=config, metrics=metrics,
        output_dir=args.output_dir, extra={"decode_curve": curve},
    )
    if curve and args.plot:
        from kiln.bench.plots import plot_decode_curve

        from kiln.bench.results import device_name

        title = f"{engine.model_config.architecture}, {device_name(engine.device)}"
        plot_decode_curve(curve, path.with_suffix(".png"), title=title)
    for name, value in metrics.items():
        print(f"{name:36s} {value:12.2f}")
    print(f"wrote {path}")


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
        _add_engine_args(sub)
        sub.set_defaults(func=func)
    bench = commands.add_parser("bench", help="benchmarks (JSON to benchmarks/results/)")
    benches = bench.add_subparsers(dest="bench", required=True)
    throughput = benches.add_parser("throughput", help="offline throughput of N requests")
    throughput.add_argument("model", nargs="?", default="smollm2")
    throughput.add_argument("--dataset", choices=("sharegpt", "random"), default="sharegpt")
    throughput.add_argument("--num-prompts", type=int, default=64)
    throughput.add_argument("--input-len", type=int, default=128, help="random dataset only")
    throughput.add_argument("--output-len", type=int, default=128, help="random dataset only")
    throughput.add_argument("--seed", type=int, default=0)
    throughput.add_argument("--sequential-baseline", action="store_true",
                            help="also run the requests one at a time and report the ratio")
    throughput.add_argument("--output-dir", default="benchmarks/results")
    _add_engine_args(throughput)
    throughput.set_defaults(func=cmd_bench_throughput)

    latency = benches.add_parser("latency", help="batch-1 decode, TTFT, decode vs batch size")
    latency.add_argument("model", nargs="?", default="smollm2")
    latency.add_argument("--prompt-len", type=int, default=5)
    latency.add_argument("--new-tokens", type=int, default=200)
    latency.add_argument("--ttft-lens", type=int, nargs="*", default=[128, 512, 2048, 8192])
    latency.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    latency.add_argument("--batch-new-tokens", type=int, default=64)
    latency.add_argument("--plot", action="store_true", help="write a PNG of decode tok/s vs batch")
    latency.add_argument("--hf-peer", action="store_true",
                         help="also measure transformers (static cache) at batch 1, same run")
    latency.add_argument("--output-dir", default="benchmarks/results")
    _add_engine_args(latency)
    latency.set_defaults(func=cmd_bench_latency)
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

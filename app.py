"""deltamem command line.

    deltamem generate [--model PATH] [--state FILE] [--window N] [sampling options] "prompt"
    deltamem info [--model PATH]
    deltamem sessions list | show ID | delete ID | fork ID | rewind ID --to N | export ID FILE | import FILE | gc

Errors print one line on stderr, and the exit code says what failed (see `_failure`): 1 bad input (a file,
a model, a state, the memory database, an option's value), 2 bad arguments (argparse's own code), 3 `run` stopped
at its step limit, 4 the model failed (its chat template, generation), 5 not enough memory or a device error.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

EXIT_ERROR = 1  # bad input: a file, a model, a state, the memory database, an option's value
EXIT_STEP_LIMIT = 3  # `deltamem run` stopped at --max-steps without an answer
EXIT_MODEL = 4  # the model failed (its chat template, generation)
EXIT_RESOURCE = 5  # not enough memory, or the device failed
QUANTS = ("auto", "none", "f16", "int8", "int4")  # model/packed.py's and auto (not imported: start-up defers torch)


def device_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--device",
        default=os.environ.get("DELTAMEM_DEVICE", "auto"),
        help="auto (default: the first CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N "
        "(env DELTAMEM_DEVICE)",
    )
    sp.add_argument(
        "--dtype",
        default=os.environ.get("DELTAMEM_DTYPE", "auto"),
        help="auto (default: bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16 (env DELTAMEM_DTYPE)",
    )
    sp.add_argument(
        "--quant", choices=QUANTS, default=os.environ.get("DELTAMEM_QUANT", "auto"),
        help="CPU only: weights in half precision (f16), int8 per channel or int4 per group of 32; auto (default): "
        "when decode is compiled, int8 on an AVX-512 CPU and f16 on others, else none (float32); "
        "benchmarks/results/cpu.md and cpu_avx2.md have each one's speed and perplexity (env DELTAMEM_QUANT)",
    )  # fmt: skip
    sp.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=_env_compile(),
        help="CPU only: decode steps compiled ahead of time for this CPU, at the first decode (about 40 s once, "
        "then loaded from the start-up cache in well under a second); with it --quant auto takes int8 (AVX-512) or "
        "f16, which decode 3-5x as fast as float32 eagerly. Default: on where a C++ compiler is found "
        "(env DELTAMEM_COMPILE=1 or 0)",
    )  # fmt: skip


def _env_compile() -> bool | str:
    env = os.environ.get("DELTAMEM_COMPILE", "auto").lower()
    return True if env in ("1", "on", "true") else False if env in ("0", "off", "false") else "auto"


def convert_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--convert-state",
        action="store_true",
        help="resume a state saved in another dtype by converting it (not exact; recorded), instead of refusing",
    )


def guide_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--free-tool-calls", dest="guided_calls", action="store_false",
                    help="let the model write anything in a tool call (default: only well-formed calls of the tools "
                    "offered, with arguments their schemas accept)")  # fmt: skip


def loop_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--loop-guard", type=int, default=64, metavar="N",
        help="end a reply once its last N tokens (or more) repeat one pattern of up to 32 tokens at least 4 times, "
        "a degenerate loop (default 64; 0: never)",
    )  # fmt: skip
    sp.add_argument(
        "--repetition-penalty", type=float, default=1.0, metavar="P",
        help="divide the positive logits of tokens the reply already used by P (multiply negative ones), as "
        "transformers' repetition_penalty does, over the reply only (default 1.0: off; 1.1-1.3 is usual)",
    )  # fmt: skip


def _penalty(args: argparse.Namespace) -> float:
    if not args.repetition_penalty > 0:
        raise ValueError("--repetition-penalty must be > 0 (1.0: off)")
    return args.repetition_penalty


def _loop_guard(args: argparse.Namespace):
    from deltamem.model.sampling import LoopGuard

    if args.loop_guard < 0 or args.loop_guard == 1:
        raise ValueError("--loop-guard must be 0 (off) or >= 2")
    return LoopGuard(args.loop_guard) if args.loop_guard else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltamem",
        description="Local long-memory agents on a hybrid Gated DeltaNet + attention model.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model",
            default=os.environ.get("DELTAMEM_MODEL", "default"),
            help="checkpoint directory (config.json + safetensors), a Llama .gguf file, or 'default' "
            "(the built-in model; env DELTAMEM_MODEL)",
        )
        sp.add_argument(
            "--window", type=int, help="attention window in tokens (default: the model's own: 1024 for the "
            "default model, which was trained with it; 4096 for others)"
        )
        sp.add_argument("--full-attention", action="store_true", help="no window: exact, unbounded KV cache")
        sp.add_argument("--sink", type=int, default=4, help="first tokens always kept in attention (default 4)")
        device_args(sp)

    g = sub.add_parser("generate", help="continue a prompt, streaming tokens; optionally resume/save the state")
    model_args(g)
    g.add_argument("prompt", help="text to feed (use - to read stdin)")
    g.add_argument(
        "--state",
        type=Path,
        help="snapshot file: restored before the prompt if it exists, written (atomically) afterwards",
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    convert_arg(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    loop_arg(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    sv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health) whose prompt "
        "states persist in the memory database, so re-sent conversations are not re-read",
    )
    model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--db", type=Path, default=None, help="memory database (default $DELTAMEM_DB or the data dir)")
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
                    help="decode concurrent replies together, one step for all (default: on a GPU)")
    sv.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                    help="info (default): a line a request (id, session, prompt, cached and completion tokens, "
                    "time to first token, total); warning: problems only")
    i = sub.add_parser(
        "info", help="show a model's config, sizes and fingerprint (a folder with only config.json: sizes alone)"
    )
    model_args(i)
    _sessions_parser(sub)
    _agent_parsers(sub, model_args)
    return p


def _agent_parsers(sub, model_args) -> None:
    def common(sp: argparse.ArgumentParser) -> None:
        model_args(sp)
        sp.add_argument("--repo", type=Path, default=Path("."), help="project root (default: the current directory)")
        sp.add_argument("--session", help="session title or id (default: the project folder's name)")
        sp.add_argument("--db", type=Path, default=None, help="memory database (default $DELTAMEM_DB or the data dir)")
        sp.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
        convert_arg(sp)

    def agent_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-steps", type=int, default=8, help="model calls per task before giving up (default 8)")
        sp.add_argument(
            "--approve",
            choices=["never", "ask", "always"],
            default="never",
            help="risky tools (write_file, edit, shell): never run them (default), ask on the terminal, or always",
        )
        sp.add_argument("--allow-shell", action="store_true", help="make the shell tool available (still risky)")
        sp.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model reply (default 512)")
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--no-tools", dest="tools", action="store_false",
                        help="offer no tool: the model answers from its memory (the ingested state) alone")
        sp.add_argument("--no-retrieve", dest="retrieve", action="store_false",
                        help="do not look the task's names and key words up (definition, references, grep) before "
                        "the model's first reply (default: looked up, shown to the model as an automatic tool call)")
        guide_arg(sp)
        loop_arg(sp)

    ing = sub.add_parser("ingest", help="read a project's text files into a session's memory (changed files only)")
    common(ing)
    ing.add_argument("--max-file-bytes", type=int, default=256_000, help="skip larger files (default 256000)")
    ing.add_argument(
        "--include", action="append", default=[], metavar="GLOB",
        help="feed files matching this gitignore-style pattern even if skipped by default (lock files, vendored, "
        "minified, generated and data files); repeatable",
    )  # fmt: skip
    ing.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave these files out; repeatable")
    ing.add_argument(
        "--map-tokens", type=int, default=1500, metavar="N",
        help="budget of the repository map fed last (files and their top-level definitions; default 1500; 0: none)",
    )  # fmt: skip
    ing.add_argument(
        "--dry-run", action="store_true",
        help="list what would be fed, in order, with token counts, and what is skipped and why; write nothing",
    )  # fmt: skip
    run = sub.add_parser(
        "run",
        help="run the agent on a task in a project; exit 0 on an answer, 1 bad input, 3 at the step limit, 4 model "
        "error, 5 out of memory or device error",
    )
    common(run)
    agent_args(run)
    run.add_argument("task", help="what to do (use - to read stdin)")
    chat = sub.add_parser("chat", help="a line-by-line chat with the agent (the plain-terminal REPL)")
    common(chat)
    agent_args(chat)
    tui = sub.add_parser("tui", help="the terminal UI (also what plain `deltamem` opens in a terminal)")
    model_args(tui)
    tui.add_argument("--repo", type=Path, default=Path("."), help="project root (default: the current directory)")
    tui.add_argument("--session", help="session title or id (default: the project folder's name)")
    tui.add_argument("--db", type=Path, default=None, help="memory database (default $DELTAMEM_DB or the data dir)")
    tui.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model reply (default 512)")
    tui.add_argument("--no-tools", dest="tools", action="store_false",
                     help="offer no tool: the model answers from its memory (the ingested state) alone")
    convert_arg(tui)


def _sessions_parser(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        type=Path,
        default=None,
        help="memory database (default $DELTAMEM_DB, else ~/.local/share/deltamem/memory.db)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("sessions", help="list, inspect, fork, rewind, export, import and delete saved sessions")
    ss = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = ss.add_parser("list", parents=[common], help="all sessions, most recent first")
    lst.add_argument("--project", type=Path, help="only the sessions of this project root")
    show = ss.add_parser("show", parents=[common], help="a session's turns, snapshots and ingested files")
    show.add_argument("id", help="session id, unique id prefix, or title")
    show.add_argument("--turns", type=int, default=20, help="show the last N turns (default 20; 0 = all)")
    delete = ss.add_parser("delete", parents=[common], help="delete a session (asks unless --yes)")
    delete.add_argument("id")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    fork = ss.add_parser("fork", parents=[common], help="new session from a snapshot of this one (no copy)")
    fork.add_argument("id")
    fork.add_argument("--at", type=int, default=None, metavar="TURN", help="turn to fork at (default: latest)")
    fork.add_argument("--title", help="title of the new session")
    rewind = ss.add_parser("rewind", parents=[common], help="drop the turns after TURN (asks unless --yes)")
    rewind.add_argument("id")
    rewind.add_argument("--to", type=int, required=True, metavar="TURN", help="0, or a turn with a snapshot")
    rewind.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    export = ss.add_parser("export", parents=[common], help="write a session to one portable file")
    export.add_argument("id")
    export.add_argument("file", type=Path)
    imp = ss.add_parser("import", parents=[common], help="add a session from an exported file, validated")
    imp.add_argument("file", type=Path)
    imp.add_argument("--model", help="also check that the session was saved with this model (path or 'default')")
    device_args(imp)
    gc = ss.add_parser("gc", parents=[common], help="delete snapshots and pieces no session uses; reclaim space")
    gc.add_argument("--serve-mb", type=int, default=None, metavar="MB",
                    help="first trim the states `deltamem serve` kept to MB (as its --store-mb does; 0 keeps only "
                    "the last state of each session named by X-Deltamem-Session)")


def _window(args: argparse.Namespace) -> int | None | str:
    """The attention window the model options ask for (checked with --sink)."""
    window = None if args.full_attention else ("auto" if args.window is None else args.window)
    if isinstance(window, int) and window < 1:
        raise ValueError("--window must be >= 1")
    if args.sink < 0:
        raise ValueError("--sink must be >= 0")
    return window


def _load(args: argparse.Namespace):
    """The model the options ask for; the seconds it took are kept as args.load_s (reported with --json)."""
    from deltamem.model import load_model

    t0 = time.perf_counter()
    engine = load_model(
        args.model, window=_window(args), sink=args.sink, device=args.device, dtype=args.dtype, quant=args.quant,
        compile_decode=args.compile,
    )  # fmt: skip
    args.load_s = round(time.perf_counter() - t0, 3)
    return engine


def _chat_prompt(engine, text: str) -> str:
    """The prompt in the model's own chat template, rendered in the agent's sandbox (templates come with
    downloaded files: one that reaches for Python internals is refused, and nothing of it runs)."""
    from deltamem.agent.prompt import ChatTemplate

    if not engine.tokenizer.chat_template:
        raise ValueError("this model has no chat template; drop --chat")
    return ChatTemplate.for_tokenizer(engine.tokenizer).render([{"role": "user", "content": text}])


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written snapshot behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = _load(args)
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; generate needs one")
    t0 = time.perf_counter()
    resumed = False
    if args.state and args.state.exists():
        converted = engine.restore(args.state.read_bytes(), convert_dtype=args.convert_state)
        if converted:
            print(f"deltamem: the state in {args.state} was converted from {converted}", file=sys.stderr)
        resumed = True
    t_restore = time.perf_counter() - t0
    text = _chat_prompt(engine, prompt) if args.chat else prompt
    ids = engine.tokenizer.encode(text)
    pieces = []
    t1 = time.perf_counter()
    for piece in engine.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        loop_guard=_loop_guard(args),
        repetition_penalty=_penalty(args),
    ):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    elapsed = time.perf_counter() - t1
    if args.state:
        _atomic_write(args.state, engine.snapshot())
    if args.json:
        print(
            json.dumps(
                {
                    "text": "".join(pieces),
                    "prompt_tokens": len(ids),
                    "new_tokens": len(engine.generated),
                    "stopped_by": engine.stopped_by,
                    "tokens_seen": engine.tokens_seen,
                    "resumed": resumed,
                    "restore_s": round(t_restore, 4),
                    "generate_s": round(elapsed, 4),
                    "state_bytes": engine.state_bytes(),
                }
            )
        )
    else:
        sys.stdout.write("\n")
        n = len(engine.generated)
        print(
            f"[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tok/s; "
            f"state {engine.state_bytes() / 1e6:.1f} MB"
            f"{', resumed from ' + str(args.state) if resumed else ''}"
            f"{', saved to ' + str(args.state) if args.state else ''}]",
            file=sys.stderr,
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from deltamem import kernels
    from deltamem.model.loader import DEFAULT_WINDOW
    from deltamem.model.sizes import model_sizes

    root = Path(str(args.model))
    if root.is_dir() and (root / "config.json").is_file() and not any(
        (root / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")
    ):  # a config alone: what the model would cost, without weights to load
        from deltamem.model.config import ModelConfig

        cfg = ModelConfig.from_file(root / "config.json")
        window = _window(args)
        window = DEFAULT_WINDOW if window == "auto" else window
        dtype = {"float32": torch.float32, "float16": torch.float16}.get(args.dtype, torch.bfloat16)  # auto: a GPU's
        sizes = model_sizes(cfg, window, args.sink, dtype)
        info = {"arch": cfg.arch, "weights": "absent (sizes from config.json)", "layer_types": cfg.layer_types}
        print(json.dumps({**info, **sizes}, indent=2))
        return 0
    engine = _load(args)
    cfg = engine.config
    n_params = sum(p.numel() for p in engine.model.parameters())
    backend = kernels.backend(torch.empty(0, device=engine.device))
    sizes = model_sizes(cfg, engine.window, engine.sink, engine.dtype)
    print(
        json.dumps(
            {
                "arch": cfg.arch,
                "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."),
                "parameters": n_params,
                "weight_bytes": sum(p.numel() * p.element_size() for p in engine.model.parameters()),
                "kernels": "triton" if backend == "triton" else "torch reference",
                "kernels_note": kernels.fallback_reason if engine.device.type == "cuda" else None,
                "layer_types": cfg.layer_types,
                "window": engine.window,
                "sink": engine.sink,
                "state_bytes_empty": engine.state_bytes(),
                "fingerprint": engine.fingerprint,
                "tokenizer": getattr(engine.tokenizer, "name", None),
                "load_s": args.load_s,
                **{k: sizes[k] for k in ("active_parameters", "turn_bytes", "gpu_bytes")},
            },
            indent=2,
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress
    import logging

    import uvicorn

    from deltamem.memory.store import Store
    from deltamem.server.app import create_app

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
    logging.getLogger("deltamem.server").setLevel(args.log_level.upper())
    engine = _load(args)
    with Store(args.db) as store:
        name = "default" if str(args.model) == "default" else Path(str(args.model)).name
        app = create_app(engine, store, name, args.api_key, args.max_prompt_tokens,
                         None if args.cache_mb is None else args.cache_mb << 20,
                         prefix_cache=args.prefix_cache, batch_decode=args.batch_decode, guided_calls=args.guided_calls,
                         share_prefixes=args.share_prefixes, store_bytes=(args.store_mb << 20) or None)
        print(f"deltamem serve: {name} on http://{args.host}:{args.port}/v1 (memory {store.path})", file=sys.stderr)
        # On SIGTERM/Ctrl-C each reply still streaming ends at its next token with an error event (closing its
        # generator frees the engine; uvicorn cancels what is left after 2 s), then the states kept so far are
        # written. uvicorn then raises the signal again for the handler it found: for SIGTERM that is this no-op,
        # so a service manager's stop ends in exit code 0.
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               timeout_graceful_shutdown=2))
        app.state.stopping = lambda: server.should_exit
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError("refusing without confirmation: stdin is not a terminal; pass --yes")
    from rich.prompt import Confirm

    return Confirm.ask(question, default=False)


def cmd_sessions(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from deltamem.memory.store import Store
    from deltamem.ui.format import ago, size

    out = Console(highlight=False)

    def emit(obj, text: str | None = None) -> int:
        """The result: JSON with --json, else the text (if any)."""
        if args.json:
            print(json.dumps(obj, indent=2, default=str))
        elif text is not None:
            out.print(text)
        return 0

    with Store(args.db) as store:
        if args.action == "list":
            project = store.project(args.project) if args.project else None
            rows = store.sessions(project)
            if args.json:
                return emit(rows)
            table = Table(title=f"sessions in {store.path}", title_justify="left")
            for col in ("id", "title", "project", "turns", "tokens", "snapshot", "updated"):
                wrap = col in ("title", "project")
                table.add_column(col, justify="left" if wrap or col in ("id", "updated") else "right", no_wrap=not wrap)
            for r in rows:
                table.add_row(
                    r["id"],
                    r["title"],
                    r["project_name"] or "-",
                    str(r["turns"]),
                    f"{r['tokens_seen']:,}" if r["tokens_seen"] is not None else "-",
                    size(r["snapshot_bytes"]),
                    ago(r["updated"]),
                )
            out.print(table if rows else "no sessions yet")
            return 0

        if args.action == "gc":
            if args.serve_mb is not None:
                if args.serve_mb < 0:
                    raise ValueError("--serve-mb must be >= 0")
                from deltamem.server.prefix import SERVE, USER

                store.trim(SERVE, args.serve_mb << 20, spare=SERVE + USER)
            removed = store.gc()
            return emit(
                removed,
                f"removed {removed['snapshots']} snapshots, {removed['pieces']} pieces and {removed['checkpoints']} "
                f"conversation checkpoints nobody used; {size(removed['bytes_before'])} -> "
                f"{size(removed['bytes_after'])}",
            )

        if args.action == "import":
            fingerprint = None
            if args.model:
                from deltamem.model import load_model

                fingerprint = load_model(args.model, device=args.device, dtype=args.dtype).fingerprint
            sid = store.import_(args.file, fingerprint=fingerprint)
            return emit({"session": sid}, f"imported session {sid} from {args.file}")

        from deltamem.agent import threads

        sess = store.session(args.id)
        sid = sess["id"]
        if args.action == "show":
            info = next(r for r in store.sessions() if r["id"] == sid)
            turns = store.turns(sid)
            snaps = store.snapshots(sid)
            ledger = store.ingested(sid)
            if args.json:
                return emit({"session": info, "turns": turns, "snapshots": snaps, "ingested": list(ledger.values())})
            out.print(
                f"[bold]{info['title']}[/bold]  {sid}  model {info['fingerprint'][:12]}  "
                f"project {info['project'] or '-'}"
                + (f"  forked from {info['parent_id']}" if info["parent_id"] else "")
            )
            shown = turns[-args.turns :] if args.turns else turns
            t = Table(title=f"turns ({len(shown)} of {len(turns)})", title_justify="left")
            for col, width in (("turn", 4), ("role", 9), ("tokens", 6)):
                t.add_column(col, justify="right" if col != "role" else "left", no_wrap=True, min_width=width)
            t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=max(20, out.width - 36))
            for r in shown:
                t.add_row(str(r["seq"]), r["role"], str(r["tokens"] or "-"), " ".join(r["text"].split())[:200])
            out.print(t)
            t = Table(title="snapshots (resume, fork or rewind at these turns)", title_justify="left")
            for col in ("id", "turn", "name", "tokens seen", "size", "created"):
                t.add_column(col)
            for r in snaps:
                t.add_row(
                    str(r["id"]),
                    str(r["turn_seq"]),
                    r["name"] or "",
                    f"{r['tokens_seen']:,}",
                    size(r["bytes"]),
                    r["created"][:19].replace("T", " "),
                )
            out.print(t)
            from deltamem.agent.prompt import MAP_PATH

            files = {p: r for p, r in ledger.items() if p != MAP_PATH}
            extra = f" (+ the repository map, {ledger[MAP_PATH]['tokens'] or 0:,} tokens)" if MAP_PATH in ledger else ""
            out.print(f"{len(files)} ingested files, {sum(r['tokens'] or 0 for r in files.values()):,} tokens{extra}")
            return 0

        if args.action == "delete":
            if not _confirm(f"Delete session {sess['title']!r} ({sid}) and its snapshots?", args.yes):
                out.print("kept")
                return EXIT_ERROR
            threads.delete(store, sid)
            return emit({"deleted": sid}, f"deleted session {sid}")

        if args.action == "fork":
            new = threads.fork(store, sid, at_turn=args.at, title=args.title)
            return emit({"session": new, "parent": sid}, f"forked {sid} into {new}")

        if args.action == "rewind":
            store.check_resume_point(sid, args.to)  # a bad turn is an error before any question
            dropped = sum(t["seq"] > args.to for t in store.turns(sid))
            if not _confirm(f"Rewind {sess['title']!r} to turn {args.to}, dropping {dropped} turns?", args.yes):
                out.print("kept")
                return EXIT_ERROR
            threads.rewind(store, sid, args.to)
            done = {"session": sid, "turn": args.to, "dropped": dropped}
            return emit(done, f"rewound {sid} to turn {args.to} ({dropped} turns dropped)")

        if args.action == "export":
            info = store.export(sid, args.file)
            return emit(info, f"exported {sid} to {args.file} ({size(info['bytes'])})")
    raise AssertionError(args.action)


def _agent(args: argparse.Namespace):
    from deltamem.agent.runner import Agent
    from deltamem.memory.store import Store

    if not args.repo.is_dir():
        raise ValueError(f"--repo {args.repo}: not a directory")
    if getattr(args, "max_steps", 1) < 1:
        raise ValueError("--max-steps must be >= 1")
    engine = _load(args)  # a model that cannot load writes nothing, the memory database included
    store = Store(args.db)
    atexit.register(store.close)  # gives back the session's lease: the next command finds it free, not abandoned
    name = args.session or args.repo.resolve().name
    kw = {}
    if args.command != "ingest":
        kw = dict(
            approve=args.approve,
            max_steps=args.max_steps,
            allow_shell=args.allow_shell,
            max_new_tokens=args.max_new_tokens,
            guided_calls=args.guided_calls,
            tools=args.tools,
            retrieve=args.retrieve,
        )
    agent = Agent(engine, store, name, args.repo, convert_state=args.convert_state, **kw)
    agent.load_s = args.load_s  # reported with --json
    if args.command != "ingest":
        agent.session.sampling = {
            "temperature": args.temperature, "seed": args.seed, "repetition_penalty": _penalty(args)
        }
        agent.session.loop_guard = _loop_guard(args)
    return agent


def _ask(pending: dict) -> bool:
    """The terminal's answer to a risky tool call (no terminal: no)."""
    if not sys.stdin.isatty():
        print(f"deltamem: declined {pending['tool']} (no terminal to ask; use --approve always)", file=sys.stderr)
        return False
    from rich.prompt import Confirm

    args = json.dumps(pending["arguments"], ensure_ascii=False)
    return Confirm.ask(f"Allow [bold]{pending['tool']}[/bold] {args[:300]}?", default=False)


def cmd_ingest(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deltamem.agent.hygiene import Rules

    rules = Rules(args.include, args.exclude)
    if args.map_tokens < 0:
        raise ValueError("--map-tokens must be >= 0 (0: no repository map)")
    if args.dry_run:
        return _ingest_dry_run(args, rules)
    agent = _agent(args)
    start = time.perf_counter()
    progress = Progress(
        TextColumn("ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TextColumn("{task.fields[rate]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[path]}"),
        console=Console(stderr=True),
        disable=args.json,
        transient=False,
    )
    task = None
    tokens = 0

    def on_event(e: dict) -> None:
        nonlocal task, tokens
        if "scan" in e:
            task = progress.add_task("ingest", total=e["scan"]["changed"], tokens=0, rate=0.0, path="")
        elif "file" in e:
            tokens += e["tokens"]
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, tokens=tokens, rate=rate, path=e["file"][-40:])

    with progress:
        result = agent.ingest(on_event, max_bytes=args.max_file_bytes, rules=rules, map_tokens=args.map_tokens)
    elapsed = time.perf_counter() - start
    summary = {
        "session": agent.session_id,
        "files": result.files,
        "removed": result.removed,
        "unchanged": result.unchanged,
        "skipped": [{"path": p, "why": w} for p, w in result.skipped],
        "tokens": result.tokens,
        "seconds": round(elapsed, 3),
        "snapshot": result.snapshot_id,
        "tokens_seen": agent.session.engine.tokens_seen,
        "timing": result.timing,
        "load_s": getattr(agent, "load_s", None),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"ingested {result.files} files ({result.tokens:,} tokens, {result.tokens / max(elapsed, 1e-9):,.0f} "
            f"tok/s), {result.removed} removed, {result.unchanged} unchanged, {len(result.skipped)} skipped; "
            f"session {agent.session_id} has read {agent.session.engine.tokens_seen:,} tokens",
            file=sys.stderr,
        )
    return 0


def _ingest_dry_run(args: argparse.Namespace, rules) -> int:
    """What `ingest` would feed (new, changed and removed files, in feed order, with their tokens) and skip, against
    the session's ledger if it exists; nothing is written."""
    from deltamem.agent.prompt import ChatTemplate, file_message
    from deltamem.agent.runner import scan_project
    from deltamem.memory.errors import NotFound
    from deltamem.memory.store import Store, default_db_path

    if not args.repo.is_dir():
        raise ValueError(f"--repo {args.repo}: not a directory")
    root = args.repo.resolve()
    ledger: dict = {}
    db = args.db or default_db_path()
    if Path(db).exists():
        with Store(db) as store:
            project = store.project_id(root)
            try:
                if project is not None:
                    ledger = store.ingested(store.session(args.session or root.name, project)["id"])
            except NotFound:
                pass
    changes, result = scan_project(root, ledger, args.max_file_bytes, rules, args.map_tokens)
    engine = _load(args)  # for its tokenizer and chat template: the counts are the tokens ingest would feed
    template = ChatTemplate.for_tokenizer(engine.tokenizer)
    files = []
    for ch in changes:
        text = template.render([file_message(ch.path, ch.text)], add_generation_prompt=False)
        kind = "removed" if ch.text is None else "changed" if ch.path in ledger else "new"
        files.append({"path": ch.path, "change": kind, "tokens": len(engine.tokenizer.encode(text))})
    skipped = [{"path": p, "why": w} for p, w in result.skipped]
    total = sum(f["tokens"] for f in files)
    if args.json:
        print(json.dumps({"files": files, "tokens": total, "unchanged": result.unchanged, "skipped": skipped}))
        return 0
    for f in files:
        print(f"{f['tokens']:>9,}  {f['change']:<8} {f['path']}")
    print(f"{total:>9,}  tokens in {len(files)} files, fed in this order; {result.unchanged} unchanged")
    for s in skipped:
        print(f"{'skipped':>9}  {s['path']}: {s['why']}")
    return 0


def _run_task(agent, task: str, as_json: bool, approver) -> int:
    def on_event(e: dict) -> None:
        if as_json:
            return
        if "token" in e:
            sys.stdout.write(e["token"])
            sys.stdout.flush()
        elif "tool" in e:
            status = ("ok" if e["ok"] else "failed") + (", looked up before the reply" if e.get("auto") else "")
            print(f"\n[{e['tool']} {json.dumps(e['arguments'], ensure_ascii=False)[:120]}: {status}]", file=sys.stderr)
        elif "retry" in e:
            print("\n[the answer cites no file the tools showed: asked once more]", file=sys.stderr)

    from deltamem.model.errors import GenerationError

    try:
        result = agent.run(task, on_event, approver)  # failures: main() names them and picks the exit code
    except Exception as e:
        if _failure(e)[0] is not None or os.environ.get("DELTAMEM_DEBUG"):
            raise
        raise GenerationError(f"{type(e).__name__}: {e}") from e  # no known cause: the run itself failed
    code = 0 if result.outcome == "answer" else EXIT_STEP_LIMIT
    if as_json:
        print(
            json.dumps(
                {
                    "outcome": result.outcome,
                    "answer": result.answer,
                    "tool_calls": [
                        {k: c.get(k, False) for k in ("tool", "arguments", "ok", "result", "auto")}
                        for c in result.tool_calls
                    ],
                    "grounded": result.grounded,
                    "tokens_fed": result.tokens_fed,
                    "session": result.session_id,
                    "snapshot": result.snapshot_id,
                    "tokens_seen": agent.session.engine.tokens_seen,
                    "timing": result.timing,
                    "load_s": getattr(agent, "load_s", None),
                }
            )
        )
    else:
        sys.stdout.write("\n")
        if code == EXIT_STEP_LIMIT:
            print("deltamem: stopped at the step limit without an answer (--max-steps)", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    task = sys.stdin.read() if args.task == "-" else args.task
    if not task.strip():
        print("deltamem: error: the task is empty", file=sys.stderr)
        return 2
    return _run_task(_agent(args), task, args.json, _ask if args.approve == "ask" else None)


def cmd_tui(args: argparse.Namespace) -> int:
    from deltamem.ui.app import DeltamemApp

    if not args.repo.is_dir():
        raise ValueError(f"--repo {args.repo}: not a directory")
    window = _window(args)
    app = DeltamemApp(
        args.db,
        args.repo,
        args.session,
        args.model,
        window,
        args.max_new_tokens,
        args.sink,
        args.device,
        args.dtype,
        convert_state=args.convert_state,
        quant=args.quant,
        compile_decode=args.compile,
        tools=args.tools,
    )
    app.run()
    if app.loading_model:  # quit while the model was loading: nothing of it to keep, and no waiting for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    agent = _agent(args)
    approver = _ask if args.approve == "ask" else None
    print(
        f"session {agent.session_id} ({agent.session.engine.tokens_seen:,} tokens in memory); /quit to leave",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("" if args.json else "you> ")  # --json: stdout holds one JSON object per turn
        except EOFError:
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip():
            try:
                _run_task(agent, line, args.json, approver)
            except Exception as e:  # said, and the chat goes on from the last saved turn
                code, message = _failure(e)
                if code is None:
                    raise
                print(f"\ndeltamem: {message}", file=sys.stderr)
                agent.back_to_last_save()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # plain `deltamem`: the TUI in a terminal, the help elsewhere
        if sys.stdin.isatty() and sys.stdout.isatty():
            args = parser.parse_args(["tui"])
        else:
            parser.print_help(sys.stderr)
            return 2
    import logging

    logging.basicConfig(level=logging.WARNING, format="deltamem: %(message)s")
    try:
        commands = {
            "generate": cmd_generate,
            "info": cmd_info,
            "serve": cmd_serve,
            "sessions": cmd_sessions,
            "ingest": cmd_ingest,
            "run": cmd_run,
            "chat": cmd_chat,
            "tui": cmd_tui,
        }
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("deltamem: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code, message = _failure(e)
        if code is None:  # a bug: one line for the user, the traceback with DELTAMEM_DEBUG=1
            if os.environ.get("DELTAMEM_DEBUG"):
                raise
            code = EXIT_ERROR
            message = f"internal error: {type(e).__name__}: {e} (DELTAMEM_DEBUG=1 shows the traceback)"
        print(f"deltamem: {message}", file=sys.stderr)
        return code


def _failure(e: Exception) -> tuple[int | None, str]:
    """The exit code and message for a failure, by its cause; (None, ...) for one that is a bug."""
    from deltamem.agent.prompt import TemplateError
    from deltamem.memory.errors import StoreError
    from deltamem.model.errors import DeltamemError, DeviceError, GenerationError, OutOfMemory, resource_error

    if isinstance(e, OutOfMemory | DeviceError):
        return EXIT_RESOURCE, f"error: {e}"
    err = resource_error(e, "")  # torch's own out-of-memory and device errors, wherever they came from
    if err is not None:
        return EXIT_RESOURCE, f"error: {err}"
    if isinstance(e, TemplateError | GenerationError):
        return EXIT_MODEL, f"model error: {e}"
    if isinstance(e, DeltamemError | StoreError | ValueError | OSError | sqlite3.Error):
        return EXIT_ERROR, f"error: {e}"
    return None, ""


if __name__ == "__main__":
    sys.exit(main())

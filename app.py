"""deltamem command line.

    deltamem generate [--model PATH] [--state FILE] [--window N] [sampling options] "prompt"
    deltamem info [--model PATH]

Errors a user can cause print one line on stderr and exit non-zero: 1 for a model, state or runtime problem,
2 for bad arguments (argparse's own code).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

EXIT_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltamem",
        description="Local long-memory agents on a hybrid Gated DeltaNet + attention model.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model",
            default=os.environ.get("DELTAMEM_MODEL", "default"),
            help="checkpoint directory (config.json + safetensors), a Llama .gguf file, or 'default' "
            "(the built-in model; env DELTAMEM_MODEL)",
        )
        sp.add_argument("--window", type=int, default=4096, help="attention window in tokens (default 4096)")
        sp.add_argument("--full-attention", action="store_true", help="no window: exact, unbounded KV cache")
        sp.add_argument("--sink", type=int, default=4, help="first tokens always kept in attention (default 4)")

    g = sub.add_parser("generate", help="continue a prompt, streaming tokens; optionally resume/save the state")
    model_args(g)
    g.add_argument("prompt", help="text to feed (use - to read stdin)")
    g.add_argument(
        "--state",
        type=Path,
        help="snapshot file: restored before the prompt if it exists, written (atomically) afterwards",
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    i = sub.add_parser("info", help="show a model's config, state size and fingerprint")
    model_args(i)
    return p


def _load(args: argparse.Namespace):
    from model import load_model

    window = None if args.full_attention else args.window
    if window is not None and window < 1:
        raise ValueError("--window must be >= 1")
    if args.sink < 0:
        raise ValueError("--sink must be >= 0")
    return load_model(args.model, window=window, sink=args.sink)


def _chat_prompt(engine, text: str) -> str:
    import jinja2

    template = engine.tokenizer.chat_template
    if not template:
        raise ValueError("this model has no chat template; drop --chat")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": text}], add_generation_prompt=True
    )


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
        engine.restore(args.state.read_bytes())
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
    engine = _load(args)
    cfg = engine.config
    n_params = sum(p.numel() for p in engine.model.parameters())
    print(
        json.dumps(
            {
                "arch": cfg.arch,
                "parameters": n_params,
                "layer_types": cfg.layer_types,
                "window": engine.window,
                "sink": engine.sink,
                "state_bytes_empty": engine.state_bytes(),
                "fingerprint": engine.fingerprint,
                "tokenizer": getattr(engine.tokenizer, "name", None),
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.errors import DeltamemError

    try:
        return {"generate": cmd_generate, "info": cmd_info}[args.command](args)
    except (DeltamemError, ValueError, OSError) as e:
        print(f"deltamem: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("deltamem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""deltamem generate and deltamem info: a model on its own, without the agent."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from deltamem.cli.options import convert_arg, load, loop_arg, loop_guard, model_args, model_options, penalty


def register(sub) -> None:
    generate_parser(sub)
    info_parser(sub)


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


def generate_parser(sub) -> None:
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
    g.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = load(args)
    if engine.tokenizer is None:
        raise ValueError(f"{model_options(args).model} has no tokenizer.json; generate needs one")
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
        loop_guard=loop_guard(args),
        repetition_penalty=penalty(args),
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


def info_parser(sub) -> None:
    i = sub.add_parser(
        "info", help="show a model's config, sizes and fingerprint (a folder with only config.json: sizes alone)"
    )
    model_args(i)
    i.set_defaults(run=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from deltamem import kernels
    from deltamem.model.loader import DEFAULT_WINDOW
    from deltamem.model.sizes import model_sizes

    options = model_options(args)
    root = Path(options.model)
    if root.is_dir() and (root / "config.json").is_file() and not any(
        (root / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")
    ):  # a config alone: what the model would cost, without weights to load
        from deltamem.model.config import ModelConfig

        cfg = ModelConfig.from_file(root / "config.json")
        window = DEFAULT_WINDOW if options.window == "auto" else options.window
        dtype = {"float32": torch.float32, "float16": torch.float16}.get(options.dtype, torch.bfloat16)  # auto: a GPU's
        sizes = model_sizes(cfg, window, options.sink, dtype)
        info = {"arch": cfg.arch, "weights": "absent (sizes from config.json)", "layer_types": cfg.layer_types}
        print(json.dumps({**info, **sizes}, indent=2))
        return 0
    engine = load(args)
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

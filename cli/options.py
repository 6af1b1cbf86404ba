"""Options several commands share: the model's (one ModelOptions, model/options.py), the memory database, sampling
guards; and the model loading every command does the same way."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from deltamem.model.options import QUANTS, ModelOptions


def device_args(sp: argparse.ArgumentParser) -> None:
    """--device, --dtype, --quant and --compile; left out, ModelOptions' defaults (their environment variables)."""
    sp.add_argument(
        "--device",
        help="auto (default: the first CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N "
        "(env DELTAMEM_DEVICE)",
    )
    sp.add_argument(
        "--dtype",
        help="auto (default: bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16 (env DELTAMEM_DTYPE)",
    )
    sp.add_argument(
        "--quant", choices=QUANTS,
        help="CPU only: weights in half precision (f16), int8 per channel or int4 per group of 32; auto (default): "
        "when decode is compiled, int8 on an AVX-512 CPU and f16 on others, else none (float32); "
        "benchmarks/results/cpu.md and cpu_avx2.md have each one's speed and perplexity (env DELTAMEM_QUANT)",
    )  # fmt: skip
    sp.add_argument(
        "--compile", action=argparse.BooleanOptionalAction,
        help="CPU only: decode steps compiled ahead of time for this CPU, at the first decode (about 40 s once, "
        "then loaded from the start-up cache in well under a second); with it --quant auto takes int8 (AVX-512) or "
        "f16, which decode 3-5x as fast as float32 eagerly. Default: on where a C++ compiler is found "
        "(env DELTAMEM_COMPILE=1 or 0)",
    )  # fmt: skip


def model_args(sp: argparse.ArgumentParser) -> None:
    """Which model, its attention window, and device_args."""
    sp.add_argument(
        "--model",
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


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The ModelOptions the command line asks for: what it gives, ModelOptions' defaults for the rest."""
    given = {k: getattr(args, k, None) for k in ("model", "device", "dtype", "quant", "compile")}
    window = None if getattr(args, "full_attention", False) else ("auto" if args.window is None else args.window)
    return ModelOptions(**{k: v for k, v in given.items() if v is not None}, window=window, sink=args.sink)


def load(args: argparse.Namespace):
    """The model the options ask for; the seconds it took are kept as args.load_s (reported with --json)."""
    options = model_options(args)
    t0 = time.perf_counter()
    engine = options.load()
    args.load_s = round(time.perf_counter() - t0, 3)
    return engine


def db_target(text: str) -> Path | str:
    """--db: a SQLite file's path, or a postgresql:// URL as it is."""
    from deltamem.memory import pgdb

    return text if pgdb.is_url(text) else Path(text)


def agent_db(db: Path | str | None) -> None:
    """Where the agent keeps its conversation (run, chat, ingest, tui): on a PostgreSQL memory database, LangGraph's
    PostgreSQL saver, which the `cluster` extra installs. Without it the command stops here, before a model loads."""
    from deltamem.memory import checkpoints, pgdb
    from deltamem.memory.store import default_db_path

    if pgdb.is_url(str(db if db is not None else default_db_path())):
        checkpoints.postgres_saver()  # (which imports psycopg too)


def db_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--db", type=db_target, default=None,
                    help="memory database: a SQLite file, or postgresql://USER@HOST/DB (the database must "
                         "exist; needs the `cluster` extra) (default $DELTAMEM_DB, else "
                         "~/.local/share/deltamem/memory.db)")
    sp.add_argument("--objects", metavar="URL", default=None,
                    help="keep snapshot pieces in object storage: file:///FOLDER or s3://BUCKET/PREFIX (S3 settings "
                         "from the AWS_* variables, e.g. AWS_ENDPOINT_URL); default: what the database recorded on "
                         "first use, else $DELTAMEM_OBJECTS, else inside the database")


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


def penalty(args: argparse.Namespace) -> float:
    if not args.repetition_penalty > 0:
        raise ValueError("--repetition-penalty must be > 0 (1.0: off)")
    return args.repetition_penalty


def loop_guard(args: argparse.Namespace):
    from deltamem.model.sampling import LoopGuard

    if args.loop_guard < 0 or args.loop_guard == 1:
        raise ValueError("--loop-guard must be 0 (off) or >= 2")
    return LoopGuard(args.loop_guard) if args.loop_guard else None

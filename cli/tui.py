"""deltamem tui: the terminal UI (ui/), also what plain `deltamem` opens in a terminal."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deltamem.cli.options import agent_db, convert_arg, db_arg, model_args, model_options


def register(sub) -> None:
    tui = sub.add_parser("tui", help="the terminal UI (also what plain `deltamem` opens in a terminal)")
    model_args(tui)
    tui.add_argument("--repo", type=Path, default=Path("."), help="project root (default: the current directory)")
    tui.add_argument("--session", help="session title or id (default: the project folder's name)")
    db_arg(tui)
    tui.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model reply (default 512)")
    tui.add_argument("--no-tools", dest="tools", action="store_false",
                     help="offer no tool: the model answers from its memory (the ingested state) alone")
    convert_arg(tui)
    tui.set_defaults(run=cmd_tui)


def cmd_tui(args: argparse.Namespace) -> int:
    from deltamem.ui.app import DeltamemApp

    if not args.repo.is_dir():
        raise ValueError(f"--repo {args.repo}: not a directory")
    agent_db(args.db)
    app = DeltamemApp(
        args.db, args.repo, args.session, model_options(args), args.max_new_tokens,
        convert_state=args.convert_state, tools=args.tools,
    )  # fmt: skip
    app.run()
    if app.loading_model:  # quit while the model was loading: nothing of it to keep, and no waiting for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0

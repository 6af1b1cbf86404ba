"""deltamem command line: one module per command group, each subcommand's options beside its handler.

    deltamem generate | info                  cli/generate.py   a model on its own
    deltamem ingest | run | chat              cli/agent.py      the agent over a project
    deltamem tui                              cli/tui.py        the terminal UI (plain `deltamem` in a terminal)
    deltamem serve                            cli/serve.py      the OpenAI-compatible API
    deltamem sessions list | show | ...       cli/sessions.py   saved sessions

Options several commands share are in cli/options.py; exit codes and error messages in cli/errors.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from deltamem.cli import agent, generate, serve, sessions, tui
from deltamem.cli.errors import EXIT_ERROR, failure


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltamem",
        description="Local long-memory agents on a hybrid Gated DeltaNet + attention model.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in (generate, serve, sessions, agent, tui):
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:  # plain `deltamem`: the TUI in a terminal, the help elsewhere
        if sys.stdin.isatty() and sys.stdout.isatty():
            args = p.parse_args(["tui"])
        else:
            p.print_help(sys.stderr)
            return 2
    import logging

    logging.basicConfig(level=logging.WARNING, format="deltamem: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("deltamem: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code, message = failure(e)
        if code is None:  # a bug: one line for the user, the traceback with DELTAMEM_DEBUG=1
            if os.environ.get("DELTAMEM_DEBUG"):
                raise
            code = EXIT_ERROR
            message = f"internal error: {type(e).__name__}: {e} (DELTAMEM_DEBUG=1 shows the traceback)"
        print(f"deltamem: {message}", file=sys.stderr)
        return code

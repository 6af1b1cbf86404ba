"""deltamem ingest, run and chat: the agent over a project, from the command line."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from pathlib import Path

from deltamem.cli.errors import EXIT_STEP_LIMIT, failure
from deltamem.cli.options import (
    agent_db,
    convert_arg,
    db_arg,
    guide_arg,
    load,
    loop_arg,
    loop_guard,
    model_args,
    penalty,
)


def register(sub) -> None:
    for group in (ingest_parser, run_parser, chat_parser):
        group(sub)


def _common(sp: argparse.ArgumentParser) -> None:
    model_args(sp)
    sp.add_argument("--repo", type=Path, default=Path("."), help="project root (default: the current directory)")
    sp.add_argument("--session", help="session title or id (default: the project folder's name)")
    db_arg(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
    convert_arg(sp)


def _agent_args(sp: argparse.ArgumentParser) -> None:
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


def _agent(args: argparse.Namespace):
    from deltamem.agent.runner import Agent
    from deltamem.memory.store import Store

    if not args.repo.is_dir():
        raise ValueError(f"--repo {args.repo}: not a directory")
    if getattr(args, "max_steps", 1) < 1:
        raise ValueError("--max-steps must be >= 1")
    agent_db(args.db)
    engine = load(args)  # a model that cannot load writes nothing, the memory database included
    store = Store(args.db, objects=args.objects)
    atexit.register(store.close)  # gives back the session's lease: the next command finds it free, not abandoned
    name = args.session or args.repo.resolve().name
    kw = {}
    if args.command != "ingest":
        options = ("approve", "max_steps", "allow_shell", "max_new_tokens", "guided_calls", "tools", "retrieve")
        kw = {k: getattr(args, k) for k in options}
        kw["sampling"] = {"temperature": args.temperature, "seed": args.seed, "repetition_penalty": penalty(args)}
        kw["loop_guard"] = loop_guard(args)
    return Agent(engine, store, name, args.repo, convert_state=args.convert_state, **kw)


def _ask(pending: dict) -> bool:
    """The terminal's answer to a risky tool call (no terminal: no)."""
    if not sys.stdin.isatty():
        print(f"deltamem: declined {pending['tool']} (no terminal to ask; use --approve always)", file=sys.stderr)
        return False
    from rich.prompt import Confirm

    args = json.dumps(pending["arguments"], ensure_ascii=False)
    return Confirm.ask(f"Allow [bold]{pending['tool']}[/bold] {args[:300]}?", default=False)


def ingest_parser(sub) -> None:
    ing = sub.add_parser("ingest", help="read a project's text files into a session's memory (changed files only)")
    _common(ing)
    ing.set_defaults(run=cmd_ingest)
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
        "load_s": getattr(args, "load_s", None),
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
    from deltamem.memory import pgdb
    from deltamem.memory.errors import NotFound
    from deltamem.memory.store import Store, default_db_path

    if not args.repo.is_dir():
        raise ValueError(f"--repo {args.repo}: not a directory")
    agent_db(args.db)
    root = args.repo.resolve()
    ledger: dict = {}
    db = args.db or default_db_path()
    if pgdb.is_url(str(db)) or Path(db).exists():
        with Store(db, objects=args.objects) as store:
            project = store.project_id(root)
            try:
                if project is not None:
                    ledger = store.ingested(store.session(args.session or root.name, project)["id"])
            except NotFound:
                pass
    changes, result = scan_project(root, ledger, args.max_file_bytes, rules, args.map_tokens)
    engine = load(args)  # for its tokenizer and chat template: the counts are the tokens ingest would feed
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


def _run_task(agent, task: str, as_json: bool, approver, load_s: float | None = None) -> int:
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
            print(f"\n[asked once more: {e['retry'].split('. ')[0]}]", file=sys.stderr)

    from deltamem.model.errors import GenerationError

    try:
        result = agent.run(task, on_event, approver)  # failures: main() names them and picks the exit code
    except Exception as e:
        if failure(e)[0] is not None or os.environ.get("DELTAMEM_DEBUG"):
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
                    "retried": result.retried,
                    "tokens_fed": result.tokens_fed,
                    "session": result.session_id,
                    "snapshot": result.snapshot_id,
                    "tokens_seen": agent.session.engine.tokens_seen,
                    "timing": result.timing,
                    "load_s": load_s,
                }
            )
        )
    else:
        sys.stdout.write("\n")
        if code == EXIT_STEP_LIMIT:
            print("deltamem: stopped at the step limit without an answer (--max-steps)", file=sys.stderr)
    return code


def run_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        help="run the agent on a task in a project; exit 0 on an answer, 1 bad input, 3 at the step limit, 4 model "
        "error, 5 out of memory or device error",
    )
    _common(run)
    run.set_defaults(run=cmd_run)
    _agent_args(run)
    run.add_argument("task", help="what to do (use - to read stdin)")


def cmd_run(args: argparse.Namespace) -> int:
    task = sys.stdin.read() if args.task == "-" else args.task
    if not task.strip():
        print("deltamem: error: the task is empty", file=sys.stderr)
        return 2
    return _run_task(_agent(args), task, args.json, _ask if args.approve == "ask" else None, args.load_s)


def chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="a line-by-line chat with the agent (the plain-terminal REPL)")
    _common(chat)
    chat.set_defaults(run=cmd_chat)
    _agent_args(chat)


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
                _run_task(agent, line, args.json, approver, args.load_s)
            except Exception as e:  # said, and the chat goes on from the last saved turn
                code, message = failure(e)
                if code is None:
                    raise
                print(f"\ndeltamem: {message}", file=sys.stderr)
                agent.back_to_last_save()

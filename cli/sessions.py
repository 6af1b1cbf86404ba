"""deltamem sessions: list, show, delete, fork, rewind, export, import and gc of saved sessions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deltamem.cli.errors import EXIT_ERROR
from deltamem.cli.options import db_arg, device_args
from deltamem.model.options import ModelOptions


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    db_arg(common)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("sessions", help="list, inspect, pin, fork, rewind, export, import and delete saved sessions")
    s.set_defaults(run=cmd_sessions)
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
    pin = ss.add_parser("pin", parents=[common],
                        help="name a snapshot, which retention then keeps (resume, fork or rewind at it later)")
    pin.add_argument("id")
    pin.add_argument("name", nargs="?", help="the snapshot's name (left out with --unpin)")
    pin.add_argument("--at", type=int, default=None, metavar="TURN", help="the snapshot at this turn (default: latest)")
    pin.add_argument("--unpin", action="store_true", help="drop the name: retention may delete the snapshot again")
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
            if args.model:  # the weights' fingerprint; quantizing or compiling them would not change it
                given = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
                fingerprint = ModelOptions(args.model, **given, quant="none", compile=False).load().fingerprint
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

        if args.action == "pin":
            if args.unpin == bool(args.name and args.name.strip()):
                raise ValueError("give a NAME to pin, or --unpin without one")
            snaps = store.snapshots(sid)
            at = [r for r in snaps if args.at is None or r["turn_seq"] == args.at][-1:]
            if not at:
                turns = ", ".join(str(r["turn_seq"]) for r in snaps) or "none"
                raise ValueError(f"session {sid} has no snapshot at turn {args.at} (snapshots at turns: {turns})")
            name = None if args.unpin else args.name.strip()
            store.name_snapshot(sid, at[0]["id"], name)
            done = {"session": sid, "snapshot": at[0]["id"], "turn": at[0]["turn_seq"], "name": name}
            what = f"pinned snapshot {at[0]['id']} (turn {at[0]['turn_seq']}) as {name!r}" if name else \
                f"unpinned snapshot {at[0]['id']} (turn {at[0]['turn_seq']})"
            return emit(done, what)

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

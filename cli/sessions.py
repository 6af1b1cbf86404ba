"""deltamem sessions: list, show, pin, delete, fork, rewind, export, import and gc of saved sessions; each action's
options beside its handler, which gets the open store (`Run`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltamem.cli.errors import EXIT_ERROR
from deltamem.cli.options import db_arg, device_args
from deltamem.model.options import ModelOptions


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    db_arg(common)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("sessions", help="list, inspect, pin, fork, rewind, export, import and delete saved sessions")
    s.set_defaults(run=cmd_sessions)
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in (list_, show, pin, delete, fork, rewind, export, import_, gc):
        action(actions, common)


@dataclass
class Run:
    """An action's arguments, the open store, the console, and (for actions on one session) that session."""

    args: argparse.Namespace
    store: Any
    out: Any
    session: dict | None = None

    @property
    def sid(self) -> str:
        return self.session["id"]

    def emit(self, obj, text: str | None = None) -> int:
        """The result: JSON with --json, else the text (if any)."""
        if self.args.json:
            print(json.dumps(obj, indent=2, default=str))
        elif text is not None:
            self.out.print(text)
        return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deltamem.memory.store import Store

    with Store(args.db, objects=args.objects) as store:
        c = Run(args, store, Console(highlight=False))
        if getattr(args, "id", None) is not None:
            c.session = store.session(args.id)
        return args.handle(c)


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError("refusing without confirmation: stdin is not a terminal; pass --yes")
    from rich.prompt import Confirm

    return Confirm.ask(question, default=False)


def list_(actions, common) -> None:
    p = actions.add_parser("list", parents=[common], help="all sessions, most recent first")
    p.add_argument("--project", type=Path, help="only the sessions of this project root")
    p.set_defaults(handle=list_sessions)


def list_sessions(c: Run) -> int:
    from rich.table import Table

    from deltamem.ui.format import ago, size

    project = c.store.project(c.args.project) if c.args.project else None
    rows = c.store.sessions(project)
    if c.args.json:
        return c.emit(rows)
    table = Table(title=f"sessions in {c.store.path}", title_justify="left")
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
    c.out.print(table if rows else "no sessions yet")
    return 0


def show(actions, common) -> None:
    p = actions.add_parser("show", parents=[common], help="a session's turns, snapshots and ingested files")
    p.add_argument("id", help="session id, unique id prefix, or title")
    p.add_argument("--turns", type=int, default=20, help="show the last N turns (default 20; 0 = all)")
    p.set_defaults(handle=show_session)


def show_session(c: Run) -> int:
    from rich.table import Table

    from deltamem.ui.format import size

    info = next(r for r in c.store.sessions() if r["id"] == c.sid)
    turns = c.store.turns(c.sid)
    snaps = c.store.snapshots(c.sid)
    ledger = c.store.ingested(c.sid)
    if c.args.json:
        return c.emit({"session": info, "turns": turns, "snapshots": snaps, "ingested": list(ledger.values())})
    c.out.print(
        f"[bold]{info['title']}[/bold]  {c.sid}  model {info['fingerprint'][:12]}  "
        f"project {info['project'] or '-'}"
        + (f"  forked from {info['parent_id']}" if info["parent_id"] else "")
    )
    shown = turns[-c.args.turns :] if c.args.turns else turns
    t = Table(title=f"turns ({len(shown)} of {len(turns)})", title_justify="left")
    for col, width in (("turn", 4), ("role", 9), ("tokens", 6)):
        t.add_column(col, justify="right" if col != "role" else "left", no_wrap=True, min_width=width)
    t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=max(20, c.out.width - 36))
    for r in shown:
        t.add_row(str(r["seq"]), r["role"], str(r["tokens"] or "-"), " ".join(r["text"].split())[:200])
    c.out.print(t)
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
    c.out.print(t)
    from deltamem.agent.prompt import MAP_PATH

    files = {p: r for p, r in ledger.items() if p != MAP_PATH}
    extra = f" (+ the repository map, {ledger[MAP_PATH]['tokens'] or 0:,} tokens)" if MAP_PATH in ledger else ""
    c.out.print(f"{len(files)} ingested files, {sum(r['tokens'] or 0 for r in files.values()):,} tokens{extra}")
    return 0


def pin(actions, common) -> None:
    p = actions.add_parser("pin", parents=[common],
                           help="name a snapshot, which retention then keeps (resume, fork or rewind at it later)")
    p.add_argument("id")
    p.add_argument("name", nargs="?", help="the snapshot's name (with --unpin: the pinned snapshot of this name)")
    p.add_argument("--at", type=int, default=None, metavar="TURN", help="the snapshot at this turn (default: latest)")
    p.add_argument("--unpin", action="store_true", help="drop the name (of NAME or --at TURN's snapshot): retention "
                   "may delete the snapshot again")
    p.set_defaults(handle=pin_snapshot)


def pin_snapshot(c: Run) -> int:
    name = (c.args.name or "").strip()
    snaps = c.store.snapshots(c.sid)
    if c.args.unpin:  # the snapshot of that name, or the one at that turn
        if not name and c.args.at is None:
            raise ValueError("--unpin needs the snapshot's NAME or --at TURN")
        at = [r for r in snaps if (r["name"] == name if name else r["turn_seq"] == c.args.at)]
    else:
        if not name:
            raise ValueError("give a NAME to pin the snapshot by")
        at = [r for r in snaps if c.args.at is None or r["turn_seq"] == c.args.at][-1:]
    if not at:
        turns = ", ".join(str(r["turn_seq"]) for r in snaps) or "none yet"
        what = f"named {name!r}" if c.args.unpin and name else "yet" if c.args.at is None else f"at turn {c.args.at}"
        raise ValueError(f"session {c.sid} has no snapshot {what} (snapshots at turns: {turns})")
    snap = at[-1]
    c.store.name_snapshot(c.sid, snap["id"], None if c.args.unpin else name)
    done = {"session": c.sid, "snapshot": snap["id"], "turn": snap["turn_seq"], "name": None if c.args.unpin else name}
    where = f"snapshot {snap['id']} (turn {snap['turn_seq']})"
    return c.emit(done, f"unpinned {where}" if c.args.unpin else f"pinned {where} as {name!r}")


def delete(actions, common) -> None:
    p = actions.add_parser("delete", parents=[common], help="delete a session (asks unless --yes)")
    p.add_argument("id")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handle=delete_session)


def delete_session(c: Run) -> int:
    from deltamem.agent import threads

    if not _confirm(f"Delete session {c.session['title']!r} ({c.sid}) and its snapshots?", c.args.yes):
        c.out.print("kept")
        return EXIT_ERROR
    threads.delete(c.store, c.sid)
    return c.emit({"deleted": c.sid}, f"deleted session {c.sid}")


def fork(actions, common) -> None:
    p = actions.add_parser("fork", parents=[common], help="new session from a snapshot of this one (no copy)")
    p.add_argument("id")
    p.add_argument("--at", type=int, default=None, metavar="TURN", help="turn to fork at (default: latest)")
    p.add_argument("--title", help="title of the new session")
    p.set_defaults(handle=fork_session)


def fork_session(c: Run) -> int:
    from deltamem.agent import threads

    new = threads.fork(c.store, c.sid, at_turn=c.args.at, title=c.args.title)
    return c.emit({"session": new, "parent": c.sid}, f"forked {c.sid} into {new}")


def rewind(actions, common) -> None:
    p = actions.add_parser("rewind", parents=[common], help="drop the turns after TURN (asks unless --yes)")
    p.add_argument("id")
    p.add_argument("--to", type=int, required=True, metavar="TURN", help="0, or a turn with a snapshot")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handle=rewind_session)


def rewind_session(c: Run) -> int:
    from deltamem.agent import threads

    c.store.check_resume_point(c.sid, c.args.to)  # a bad turn is an error before any question
    dropped = sum(t["seq"] > c.args.to for t in c.store.turns(c.sid))
    if not _confirm(f"Rewind {c.session['title']!r} to turn {c.args.to}, dropping {dropped} turns?", c.args.yes):
        c.out.print("kept")
        return EXIT_ERROR
    threads.rewind(c.store, c.sid, c.args.to)
    done = {"session": c.sid, "turn": c.args.to, "dropped": dropped}
    return c.emit(done, f"rewound {c.sid} to turn {c.args.to} ({dropped} turns dropped)")


def export(actions, common) -> None:
    p = actions.add_parser("export", parents=[common], help="write a session to one portable file")
    p.add_argument("id")
    p.add_argument("file", type=Path)
    p.set_defaults(handle=export_session)


def export_session(c: Run) -> int:
    from deltamem.ui.format import size

    info = c.store.export(c.sid, c.args.file)
    return c.emit(info, f"exported {c.sid} to {c.args.file} ({size(info['bytes'])})")


def import_(actions, common) -> None:
    p = actions.add_parser("import", parents=[common], help="add a session from an exported file, validated")
    p.add_argument("file", type=Path)
    p.add_argument("--model", help="also check that the session was saved with this model (path or 'default')")
    device_args(p)
    p.set_defaults(handle=import_session)


def import_session(c: Run) -> int:
    fingerprint = None
    if c.args.model:  # the weights' fingerprint; quantizing or compiling them would not change it
        given = {k: v for k, v in (("device", c.args.device), ("dtype", c.args.dtype)) if v is not None}
        fingerprint = ModelOptions(c.args.model, **given, quant="none", compile=False).load().fingerprint
    sid = c.store.import_(c.args.file, fingerprint=fingerprint)
    return c.emit({"session": sid}, f"imported session {sid} from {c.args.file}")


def gc(actions, common) -> None:
    p = actions.add_parser("gc", parents=[common], help="delete snapshots and pieces no session uses; reclaim space")
    p.add_argument("--serve-mb", type=int, default=None, metavar="MB",
                   help="first trim the states `deltamem serve` kept to MB (as its --store-mb does; 0 keeps only "
                   "the last state of each session named by X-Deltamem-Session)")
    p.set_defaults(handle=collect)


def collect(c: Run) -> int:
    from deltamem.ui.format import size

    if c.args.serve_mb is not None:
        if c.args.serve_mb < 0:
            raise ValueError("--serve-mb must be >= 0")
        from deltamem.server.prefix import SERVE, USER

        c.store.trim(SERVE, c.args.serve_mb << 20, spare=SERVE + USER)
    removed = c.store.gc()
    return c.emit(
        removed,
        f"removed {removed['snapshots']} snapshots, {removed['pieces']} pieces and {removed['checkpoints']} "
        f"conversation checkpoints nobody used"
        + (f", {removed['objects']} stray objects" if c.store.objects is not None else "")
        + f"; {size(removed['bytes_before'])} -> {size(removed['bytes_after'])}",
    )

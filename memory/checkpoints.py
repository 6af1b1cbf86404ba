"""The agent's conversation threads as rows of this file: LangGraph's SQLite saver keeps them in the tables
`checkpoints` and `writes`, keyed by (thread_id, checkpoint_ns, checkpoint_id), and a session's thread id is the
session id. A snapshot row records the checkpoint taken with it (`session_snapshots.checkpoint_id`).

The store handles those rows as plain rows, without importing langgraph, so that a thread travels and is retained
with the snapshots that point into it: copied by export and import, pruned in step with snapshot retention (every
checkpoint holds the whole message list, so unpruned threads grow with the square of a session's length).
Checkpoint ids sort by time (langgraph's own "latest" is the greatest id), which pruning and export rely on.
"""

from __future__ import annotations

import re

import sqlite_utils

TABLES = ("checkpoints", "writes")


def present(db: sqlite_utils.Database) -> bool:
    return all(t in db.table_names() for t in TABLES)


def create_like(src: sqlite_utils.Database, dst: sqlite_utils.Database) -> None:
    """Create the thread tables `dst` lacks as `src` has them. src may be a file from elsewhere (an import): its
    statement must be one plain CREATE TABLE of that name (column definitions only), else ValueError."""
    for table in TABLES:
        if table not in dst.table_names():
            (sql,) = src.execute("select sql from sqlite_master where type = 'table' and name = ?", [table]).fetchone()
            if not re.fullmatch(rf"CREATE TABLE {table} \([^;]*\)", sql.strip()):
                raise ValueError(f"unexpected definition of table {table}: {sql[:200]!r}")
            dst.execute(sql)


def copy(
    src: sqlite_utils.Database, dst: sqlite_utils.Database, thread: str, new_thread: str, upto: str | None = None
) -> int:
    """Copy a thread's rows (those of checkpoints up to `upto`, if given) from src to dst under `new_thread`, in the
    callers' transactions; the columns both sides have (saver versions differ by a defaulted column). Returns the
    checkpoints copied."""
    copied = 0
    for table in TABLES:
        cols = [c for c in src[table].columns_dict if c in dst[table].columns_dict]
        where, args = "thread_id = ?", [thread]
        if upto is not None:
            where, args = where + " and checkpoint_id <= ?", [*args, upto]
        names = ", ".join(f'"{c}"' for c in cols)
        rows = src.execute(f"select {names} from {table} where {where}", args).fetchall()
        at = cols.index("thread_id")
        dst.conn.executemany(
            f"insert into {table} ({names}) values ({', '.join('?' * len(cols))})",
            [(*r[:at], new_thread, *r[at + 1 :]) for r in rows],
        )
        copied += len(rows) if table == "checkpoints" else 0
    return copied


def prune(db: sqlite_utils.Database, thread: str, keep: set[str]) -> int:
    """Delete the thread's checkpoints (and their writes) older than the newest one in `keep` and not in it: the
    ones no kept snapshot points to. Newer ones stay (a run in progress, or the state a rewind went back to).
    Returns the checkpoints deleted."""
    if not keep:
        return 0
    marks = ",".join("?" * len(keep))
    newest = max(keep)
    counts = [
        db.execute(
            f"delete from {table} where thread_id = ? and checkpoint_id < ? and checkpoint_id not in ({marks})",
            [thread, newest, *sorted(keep)],
        ).rowcount
        for table in TABLES
    ]
    return counts[0]


def drop_orphans(db: sqlite_utils.Database) -> int:
    """Delete the rows of every thread that is no session's (a deleted session's). Returns the checkpoints deleted."""
    counts = [db.execute(f"delete from {t} where thread_id not in (select id from sessions)").rowcount for t in TABLES]
    return counts[0]

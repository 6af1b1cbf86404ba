"""The agent's conversation threads as rows of the memory database, kept by LangGraph's own saver for it: on SQLite
(langgraph-checkpoint-sqlite) the tables `checkpoints` and `writes` of the same file, each checkpoint whole; on
PostgreSQL (langgraph-checkpoint-postgres) `checkpoints`, `checkpoint_blobs` and `checkpoint_writes`, the channel
values apart as blobs keyed by (thread, namespace, channel, version). Rows are keyed by (thread_id, checkpoint_ns,
checkpoint_id), and a session's thread id is the session id. A snapshot row records the checkpoint taken with it
(`session_snapshots.checkpoint_id`).

The store handles those rows as plain rows, in its own transactions, so that a thread travels and is retained with
the snapshots that point into it: copied by export and import, pruned in step with snapshot retention (every
checkpoint holds the whole message list, so unpruned threads grow with the square of a session's length).
Checkpoint ids sort by time (langgraph's own "latest" is the greatest id), which pruning and export rely on. Between
the two databases, whose rows differ, a thread goes through the savers themselves (`convert`).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from typing import Any

import sqlite_utils

from deltamem.memory import pgdb
from deltamem.memory.errors import StoreError

TABLES = ("checkpoints", "writes")  # SQLite's saver
PG_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")  # PostgreSQL's
SETUP_LOCK = 0x444D4350  # "DMCP": the advisory lock under which a first user creates PostgreSQL's tables
SETTING = "conversation_tables"  # in `settings` once deltamem made them
# a blob row some checkpoint of its thread still points to (through its channel_versions)
_REFERENCED = ("exists (select 1 from checkpoints c where c.thread_id = b.thread_id and c.checkpoint_ns = "
               "b.checkpoint_ns and c.checkpoint -> 'channel_versions' ->> b.channel = b.version{})")  # fmt: skip


def _pg(db) -> bool:
    return not isinstance(db, sqlite_utils.Database)


def tables(db) -> tuple[str, ...]:
    return PG_TABLES if _pg(db) else TABLES


def present(db) -> bool:
    names = set(db.table_names())
    return all(t in names for t in tables(db))


def create_like(src: sqlite_utils.Database, dst: sqlite_utils.Database) -> None:
    """Create the thread tables `dst` lacks as `src` has them. src may be a file from elsewhere (an import): its
    statement must be one plain CREATE TABLE of that name (column definitions only), else ValueError."""
    for table in TABLES:
        if table not in dst.table_names():
            (sql,) = src.execute("select sql from sqlite_master where type = 'table' and name = ?", [table]).fetchone()
            if not re.fullmatch(rf"CREATE TABLE {table} \([^;]*\)", sql.strip()):
                raise ValueError(f"unexpected definition of table {table}: {sql[:200]!r}")
            dst.execute(sql)


def copy(src, dst, thread: str, new_thread: str, upto: str | None = None) -> int:
    """Copy a thread's rows (those of checkpoints up to `upto`, if given) from src to dst under `new_thread`, in the
    callers' transactions: two SQLite databases (the columns both sides have: saver versions differ by a defaulted
    column), or one PostgreSQL database. Returns the checkpoints copied."""
    if _pg(src) or _pg(dst):
        if src is not dst:
            raise ValueError("a thread moves between two databases of PostgreSQL's saver, or two kinds, by convert()")
        return _pg_copy(src, thread, new_thread, upto)
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


def prune(db, thread: str, keep: set[str]) -> int:
    """Delete the thread's checkpoints (and their writes) older than the newest one in `keep` and not in it: the
    ones no kept snapshot points to. Newer ones stay (a run in progress, or the state a rewind went back to).
    Returns the checkpoints deleted."""
    if not keep:
        return 0
    marks = ",".join("?" * len(keep))
    newest = max(keep)
    counts = {
        table: db.execute(
            f"delete from {table} where thread_id = ? and checkpoint_id < ? and checkpoint_id not in ({marks})",
            [thread, newest, *sorted(keep)],
        ).rowcount
        for table in tables(db)
        if table != "checkpoint_blobs"
    }
    if _pg(db):  # the channel values no checkpoint left points to
        db.execute(f"delete from checkpoint_blobs b where b.thread_id = ? and not {_REFERENCED.format('')}", [thread])
    return counts["checkpoints"]


def drop_orphans(db) -> int:
    """Delete the rows of every thread that is no session's (a deleted session's). Returns the checkpoints deleted."""
    counts = [
        db.execute(f"delete from {t} where thread_id not in (select id from sessions)").rowcount for t in tables(db)
    ]
    return counts[0]


def delete(db, thread: str) -> None:
    """Delete a thread's rows, in the caller's transaction."""
    for table in tables(db):
        db.execute(f"delete from {table} where thread_id = ?", [thread])


def _pg_copy(db, thread: str, new_thread: str, upto: str | None) -> int:
    copied = 0
    for table in PG_TABLES:
        cols = [r[0] for r in db.execute(
            "select column_name from information_schema.columns where table_schema = current_schema() and "
            "table_name = ? order by ordinal_position", [table])]  # fmt: skip
        names = ", ".join(f'"{c}"' for c in cols)
        picked = ", ".join("?::text" if c == "thread_id" else f'b."{c}"' for c in cols)
        where, args = "b.thread_id = ?", [new_thread, thread]
        if upto is not None:  # a blob goes if a checkpoint copied points to it
            where += " and " + (_REFERENCED.format(" and c.checkpoint_id <= ?") if table == "checkpoint_blobs"
                                else "b.checkpoint_id <= ?")  # fmt: skip
            args.append(upto)
        n = db.execute(f"insert into {table} ({names}) select {picked} from {table} b where {where}", args).rowcount
        copied += n if table == "checkpoints" else 0
    return copied


def postgres_saver() -> type:
    """LangGraph's PostgreSQL saver class, or a clear error where the `cluster` extra is missing."""
    try:
        from langgraph.checkpoint.postgres import PostgresSaver
    except ImportError:
        raise StoreError("the agent's conversation on a PostgreSQL memory database needs "
                         "langgraph-checkpoint-postgres: pip install 'deltamem[cluster]'") from None
    return PostgresSaver


def saver(db) -> Any:
    """LangGraph's saver of this database, on its connection (so in the caller's transaction; SQLite's commits
    after each write, so never inside one of the store's)."""
    if _pg(db):
        return postgres_saver()(db.conn)
    from langgraph.checkpoint.sqlite import SqliteSaver

    return SqliteSaver(db.conn)


def open_saver(target: str, timeout_s: float = 30.0) -> Any:
    """LangGraph's saver of the database at `target` (a SQLite file or a postgresql:// URL) on a new connection of
    its own, its tables made or brought up to date."""
    if not pgdb.is_url(target):
        from langgraph.checkpoint.sqlite import SqliteSaver

        saver = SqliteSaver(sqlite3.connect(target, check_same_thread=False, timeout=timeout_s))
        saver.setup()
        return saver
    import psycopg
    from psycopg.rows import dict_row

    saver_class = postgres_saver()

    try:
        conn = psycopg.connect(target, autocommit=True, prepare_threshold=0, row_factory=dict_row,
                               connect_timeout=max(1, int(timeout_s)))  # fmt: skip
    except psycopg.Error as e:
        raise StoreError(f"cannot open the memory database {pgdb.redacted(target)}: {pgdb.redacted(str(e))}") from None
    try:
        setup_postgres(conn)
    except BaseException:
        conn.close()
        raise
    return saver_class(conn)


def setup_postgres(conn) -> None:
    """Create (or bring up to date) PostgreSQL's saver tables, on an autocommit connection of its own (the saver's
    migrations build indexes concurrently, which no transaction may hold), one process at a time, and mark them
    deltamem's in `settings`. Tables of those names that deltamem did not make (another LangGraph program's, whose
    threads gc would take for deleted sessions') are refused."""
    saver_class = postgres_saver()
    conn.execute("select pg_advisory_lock(%s)", [SETUP_LOCK])
    try:
        ours = conn.execute("select count(*) as n from settings where key = %s", [SETTING]).fetchone()["n"]
        there = conn.execute("select count(*) as n from pg_tables where schemaname = current_schema() and "
                             "tablename = any(%s)", [list(PG_TABLES)]).fetchone()["n"]  # fmt: skip
        if there and not ours:
            raise StoreError("this PostgreSQL database holds LangGraph checkpoint tables that deltamem did not make "
                             "(another program's conversations): give deltamem a database of its own")  # fmt: skip
        saver_class(conn).setup()
        if not ours:
            conn.execute("insert into settings (key, value) values (%s, %s) on conflict do nothing",
                         [SETTING, "langgraph-checkpoint-postgres"])  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            conn.execute("select pg_advisory_unlock(%s)", [SETUP_LOCK])


def convert(src, dst, thread: str, upto: str | None = None) -> int:
    """Copy a thread from one database to another of the other kind (or of any kind), through their savers: each
    checkpoint, oldest first, under its parent, with its pending writes. Checkpoint ids are kept, so the snapshot
    rows that point into the thread stay valid. Returns the checkpoints copied."""
    s, d = saver(src), saver(dst)  # (SQLite's makes its tables at first use; PostgreSQL's: setup_postgres)
    got = [t for t in s.list({"configurable": {"thread_id": thread}})
           if upto is None or t.config["configurable"]["checkpoint_id"] <= upto]  # fmt: skip
    for t in reversed(got):
        conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": t.config["configurable"].get("checkpoint_ns", "")}
        if t.parent_config:
            conf["checkpoint_id"] = t.parent_config["configurable"]["checkpoint_id"]
        saved = d.put({"configurable": conf}, t.checkpoint, t.metadata, t.checkpoint["channel_versions"])
        tasks: dict[str, list[tuple[str, Any]]] = {}
        for task_id, channel, value in t.pending_writes or ():
            tasks.setdefault(task_id, []).append((channel, value))
        for task_id, writes in tasks.items():
            d.put_writes(saved, writes, task_id)
    return len(got)

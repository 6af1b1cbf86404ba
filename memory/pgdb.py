"""The memory database on PostgreSQL (`--db postgresql://...`): a connection that speaks the subset of sqlite-utils'
API the store's modules use (execute, query, and a table's insert, insert_all, update, get, rows_where, upsert,
count_where), so sessions, snapshots, retention, leases and transfer run unchanged on either database.

What differs, and where it is handled:
  - placeholders: the store writes SQLite's `?` and `:name`; `_translate` rewrites them as psycopg's (and doubles a
    literal `%`), outside quoted strings;
  - the schema: SCHEMA below, one version for what SQLite reached in six migrations (memory/migrations.py); the
    version is kept in `deltamem_schema`, a newer one is refused as on SQLite;
  - full-text recall: expression GIN indexes over to_tsvector('english', ...) (stemming, as FTS5's porter) in place
    of FTS5 tables (memory/ledger.py's search);
  - one writer at a time: Store.transaction takes `pg_advisory_xact_lock(WRITE_LOCK)` after BEGIN, as SQLite's
    BEGIN IMMEDIATE takes the write lock, so every invariant that rests on serialized writers (gc against a save,
    a turn's pieces before its row) holds across processes and machines;
  - leases: a session lease also holds a session-level advisory lock on the holder's connection, which PostgreSQL
    releases when that connection ends: a holder that died on another machine is taken over (memory/leases.py).
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from deltamem.memory.errors import SchemaError, StoreError

try:
    import psycopg
    from psycopg.pq import TransactionStatus
    from psycopg.rows import dict_row
except ImportError:  # the `cluster` extra is not installed: only SQLite
    psycopg = None

DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,) + ((psycopg.Error,) if psycopg else ())
WRITE_LOCK = 0x444D454D  # "DMEM": the advisory lock every write transaction takes
PRIMARY_KEYS = {"projects": "id", "sessions": "id", "turns": "id", "snapshots": "id", "ingested": "id",
                "leases": "session_id", "settings": "key", "pieces": "sha256"}  # fmt: skip
RETURNING = {"projects", "turns", "snapshots", "ingested"}  # tables whose id the database makes

SCHEMA: list[str] = [  # version 1: the tables of SQLite's migrations m001..m006, in PostgreSQL's types
    """
    create table projects (id bigserial primary key, root text not null unique, name text, created text);
    create table sessions (id text primary key, project_id bigint references projects (id), title text,
      fingerprint text, parent_id text, parent_snapshot_id bigint, created text, updated text, keep_last integer);
    create table turns (id bigserial primary key, session_id text not null references sessions (id),
      seq integer not null, role text not null, text text, tokens integer, tool_calls text, created text,
      unique (session_id, seq));
    create index turns_search on turns using gin (to_tsvector('english', coalesce(text, '')));
    create table pieces (sha256 text primary key, bytes bigint, data bytea, object text, state text);
    create table snapshots (id bigserial primary key, fingerprint text, tokens_seen bigint, bytes bigint,
      sha256 text, prefix bytea, prefix_sha256 text, created text);
    create table snapshot_pieces (snapshot_id bigint references snapshots (id), idx integer,
      sha256 text references pieces (sha256), primary key (snapshot_id, idx));
    create index snapshot_pieces_sha256 on snapshot_pieces (sha256);
    create table snapshot_tokens (snapshot_id bigint references snapshots (id), idx integer,
      sha256 text references pieces (sha256), primary key (snapshot_id, idx));
    create index snapshot_tokens_sha256 on snapshot_tokens (sha256);
    create table session_snapshots (session_id text references sessions (id),
      snapshot_id bigint references snapshots (id), turn_seq integer, name text, checkpoint_id text,
      primary key (session_id, snapshot_id));
    create index session_snapshots_snapshot on session_snapshots (snapshot_id);
    create table ingested (id bigserial primary key, session_id text not null references sessions (id),
      turn_seq integer not null, path text not null, sha256 text, mtime double precision, bytes bigint,
      tokens integer, text text, converter text, unique (session_id, path, turn_seq));
    create index ingested_search on ingested
      using gin (to_tsvector('english', coalesce(path, '') || ' ' || coalesce(text, '')));
    create table leases (session_id text primary key references sessions (id), host text, pid integer,
      pid_start text, command text, acquired double precision);
    create table settings (key text primary key, value text);
    """,
]


def is_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL without its password (in the user part, or a `password=` parameter), for messages."""
    url = re.sub(r"^([a-z]+://[^:@/?#]*):[^@/?#]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


@functools.lru_cache(maxsize=512)
def _translate(sql: str) -> str:
    """SQLite's placeholders (`?`, `:name`) as psycopg's (`%s`, `%(name)s`), a literal `%` doubled; quoted strings
    and identifiers left as they are; `cast(x as blob)` as `bytea`."""
    out, i, n = [], 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"":
            j = sql.index(c, i + 1)
            while j + 1 < n and sql[j + 1] == c:  # a doubled quote inside the string
                j = sql.index(c, j + 2)
            out.append(sql[i : j + 1].replace("%", "%%"))
            i = j + 1
        elif c == "?":
            out.append("%s")
            i += 1
        elif c == ":" and i + 1 < n and (sql[i + 1].isalpha() or sql[i + 1] == "_") and sql[i - 1 : i] != ":":
            m = re.match(r"[A-Za-z_]\w*", sql[i + 1 :])
            out.append(f"%({m.group(0)})s")
            i += 1 + m.end()
        elif c == "%":
            out.append("%%")
            i += 1
        else:
            out.append(c)
            i += 1
    return re.sub(r"(?i)\bas\s+blob\)", "as bytea)", "".join(out))


class PgDatabase:
    """One connection to a PostgreSQL database, autocommit outside the store's explicit transactions."""

    def __init__(self, url: str, timeout_s: float):
        if psycopg is None:
            raise StoreError("a postgresql:// database needs psycopg: pip install 'deltamem[cluster]'")
        try:  # keepalives: a holder whose machine died or was cut off loses its leases in a minute, not hours
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s)), keepalives=1,
                                        keepalives_idle=30, keepalives_interval=10, keepalives_count=3)  # fmt: skip
        except psycopg.Error as e:
            raise StoreError(f"cannot open the memory database {redacted(url)}: {redacted(str(e))}".strip()) from None
        self.conn.execute(f"set lock_timeout = {int(timeout_s * 1000)}")
        for name, value in (("tcp_keepalives_idle", 30), ("tcp_keepalives_interval", 10), ("tcp_keepalives_count", 3)):
            self.conn.execute(f"set {name} = {value}")  # the server's side of the same

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != TransactionStatus.IDLE

    def execute(self, sql: str, params: Iterable[Any] | dict[str, Any] | None = None) -> psycopg.Cursor:
        args = params if isinstance(params, dict) else list(params or [])
        return self.conn.execute(_translate(sql), args)

    def query(self, sql: str, params: Iterable[Any] | dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts; the query runs now (where the caller's transaction is), not when the rows are read."""
        args = params if isinstance(params, dict) else list(params or [])
        return iter(self.conn.cursor(row_factory=dict_row).execute(_translate(sql), args))

    def __getitem__(self, name: str) -> PgTable:
        return PgTable(self, name)

    def table_names(self) -> list[str]:
        return [r[0] for r in self.execute("select tablename from pg_tables where schemaname = current_schema()")]

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """A savepoint inside the current transaction."""
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()

    def migrate(self) -> None:
        """Create the schema, or bring it to this version; refuse a newer one or a database that holds other
        tables of the same names. Inside the caller's write transaction (two first openers migrate once)."""
        tables = set(self.table_names())
        version = 0
        if "deltamem_schema" in tables:
            version = self.execute("select version from deltamem_schema").fetchone()[0]
        elif "sessions" in tables or "pieces" in tables:
            raise SchemaError("this PostgreSQL database holds tables of another program, not deltamem's")
        else:
            self.execute("create table deltamem_schema (version integer not null)")
            self.execute("insert into deltamem_schema values (0)")
        if version > len(SCHEMA):
            raise SchemaError(
                f"this database has schema version {version}, newer than this deltamem knows ({len(SCHEMA)}); "
                "upgrade deltamem to open it"
            )
        for i, ddl in enumerate(SCHEMA[version:], start=version + 1):
            self.conn.execute(ddl)  # no parameters: several statements in one go
            self.execute("update deltamem_schema set version = ?", [i])

    def version(self) -> int | None:
        if "deltamem_schema" not in self.table_names():
            return None
        return self.execute("select version from deltamem_schema").fetchone()[0]


class _Inserted:
    def __init__(self, last_pk: Any):
        self.last_pk = last_pk


class PgTable:
    """A table, with the sqlite-utils methods the store calls."""

    def __init__(self, db: PgDatabase, name: str):
        self.db, self.name = db, name

    def insert(self, row: dict[str, Any], pk: str | None = None) -> _Inserted:
        cols = list(row)
        sql = f"insert into {self.name} ({', '.join(cols)}) values ({', '.join(['?'] * len(cols))})"
        if self.name in RETURNING:
            return _Inserted(self.db.execute(sql + " returning id", [row[c] for c in cols]).fetchone()[0])
        self.db.execute(sql, [row[c] for c in cols])
        return _Inserted(row.get(PRIMARY_KEYS.get(self.name, ""), None))

    def insert_all(self, rows: Iterable[dict[str, Any]], pk: str | None = None) -> None:
        for row in rows:
            self.insert(row)

    def upsert(self, row: dict[str, Any], pk: str) -> None:
        cols = list(row)
        sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c != pk)
        self.db.execute(f"insert into {self.name} ({', '.join(cols)}) values ({', '.join(['?'] * len(cols))}) "
                        f"on conflict ({pk}) do update set {sets}", [row[c] for c in cols])  # fmt: skip

    def update(self, pk_value: Any, values: dict[str, Any]) -> None:
        sets = ", ".join(f"{c} = ?" for c in values)
        self.db.execute(f"update {self.name} set {sets} where {PRIMARY_KEYS[self.name]} = ?",
                        [*values.values(), pk_value])  # fmt: skip

    def get(self, pk_value: Any) -> dict[str, Any]:
        row = next(self.rows_where(f"{PRIMARY_KEYS[self.name]} = ?", [pk_value]), None)
        if row is None:
            raise StoreError(f"no row {pk_value!r} in {self.name}")
        return row

    def rows_where(self, where: str | None = None, where_args: Iterable[Any] | None = None,
                   order_by: str | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
        sql = f"select * from {self.name}" + (f" where {where}" if where else "")
        sql += f" order by {order_by}" if order_by else ""
        return self.db.query(sql, where_args)

    @property
    def count(self) -> int:
        return self.db.execute(f"select count(*) from {self.name}").fetchone()[0]

    def count_where(self, where: str, where_args: Iterable[Any] | None = None) -> int:
        return self.db.execute(f"select count(*) from {self.name} where {where}", where_args).fetchone()[0]

"""Store: sessions, turns, snapshots of model state and the ingest ledger, in one SQLite file (sqlite-utils, WAL), or
in a PostgreSQL database (memory/pgdb.py: the same API, for a team or a fleet of machines).

This module holds the connection (its pragmas, the schema migrations on open, the background WAL checkpoint) and the
transactions; `Store` composes the rest, one concept a module, each a base class whose methods use `self.db` and
`self.transaction()`:
  sessions.py   projects and sessions; fork, rewind, delete
  snapshots.py  turns and snapshots (content-addressed pieces, token-id chunks); load and verify
  retention.py  per-session retention, trim to a size, gc
  leases.py     one writer per session
  ledger.py     the ingest ledger and full-text recall
  transfer.py   export and import of one session

Every write that belongs together (a turn, its snapshot and its ledger entries; a fork; a rewind) is one
`BEGIN IMMEDIATE` transaction: a process killed at any moment leaves the database at the last committed turn, and
concurrent writers queue on the busy timeout instead of failing with "database is locked".
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from deltamem.memory import checkpoints, pgdb
from deltamem.memory.errors import StoreError
from deltamem.memory.leases import LEASE_WAIT_S, Lease, Leases
from deltamem.memory.ledger import Ledger
from deltamem.memory.migrations import MIGRATIONS, migrate
from deltamem.memory.objects import ENV_OBJECTS, Objects, normal_url
from deltamem.memory.retention import Retention
from deltamem.memory.sessions import Sessions
from deltamem.memory.snapshots import TOKEN_CHUNK, Snapshots
from deltamem.memory.transfer import EXPORT_FORMAT, Transfer

__all__ = ["EXPORT_FORMAT", "KEEP_LAST", "LEASE_WAIT_S", "TOKEN_CHUNK", "Lease", "Store", "default_db_path"]

ENV_DB = "DELTAMEM_DB"
KEEP_LAST = 16  # snapshots kept per session (plus named ones) unless the session or the caller says otherwise
# Pages of a new database: snapshot pieces are blobs of megabytes, stored as chains of overflow pages; 64 KiB pages
# write (and free) such a chain in a sixteenth of the steps of SQLite's default 4 KiB (measured on an H200 host:
# a save of 126 MB of new pieces 250 ms -> 160 ms with the checkpoint below moved off the save)
PAGE_SIZE = 65536
WAL_CHECKPOINT_BYTES = 64 << 20

log = logging.getLogger("deltamem.memory")


def default_db_path() -> Path | str:
    """$DELTAMEM_DB (a path, or a postgresql:// URL), else $XDG_DATA_HOME/deltamem/memory.db
    (~/.local/share/deltamem/memory.db)."""
    if os.environ.get(ENV_DB):
        return os.environ[ENV_DB] if pgdb.is_url(os.environ[ENV_DB]) else Path(os.environ[ENV_DB])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "deltamem" / "memory.db"


class Store(Sessions, Snapshots, Retention, Leases, Ledger, Transfer):
    """The memory database: open it (made and migrated if new), use it, close it (or `with`)."""

    def __init__(self, path: str | Path | None = None, busy_timeout_ms: int = 30_000, keep_last: int = KEEP_LAST,
                 objects: str | None = None):  # fmt: skip
        """path: a SQLite file (made if new), or a postgresql:// URL (memory/pgdb.py; the database must exist).
        objects: where snapshot pieces go (memory/objects.py): file:///FOLDER or s3://BUCKET/PREFIX; None: the
        URL the database recorded, else $DELTAMEM_OBJECTS, else inside the database; "": inside the database."""
        target = path if path is not None else default_db_path()
        self.keep_last = keep_last
        # the last save_turn's snapshot: bytes in all, bytes new to the store (written), seconds to save and commit
        self.last_save: dict[str, Any] = {}
        self._leases: set[str] = set()  # sessions leased through this store, released at close()
        self._doomed = False  # a transaction marked pieces for deletion from the object store
        self._busy_timeout_ms = busy_timeout_ms
        self._checkpointer: threading.Thread | None = None
        self.sqlite = not pgdb.is_url(str(target))
        self._target = str(target)  # the URL with its password, for another()
        if self.sqlite:
            self.path: Path | str = Path(target)
            self._open_sqlite(busy_timeout_ms)
        else:
            self.path = pgdb.redacted(str(target))  # what messages name: the URL without its password
            self.db = pgdb.PgDatabase(str(target), busy_timeout_ms / 1000)
            try:
                if self.db.version() != len(pgdb.SCHEMA):
                    with self.transaction():
                        self.db.migrate()
            except (*pgdb.DB_ERRORS, StoreError) as e:
                self.db.close()
                if isinstance(e, StoreError):
                    raise
                raise StoreError(f"cannot open the memory database {self.path}: {e}") from e
        try:
            self.objects = self._object_store(objects)
        except StoreError:
            self.db.close()
            raise

    def _open_sqlite(self, busy_timeout_ms: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread off: a Store may be handed between threads (UI workers), never used by two at once
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the memory database {self.path}: {e}") from e
        # autocommit connection: transaction()/_read() open the transactions we need, nothing else lingers
        self.db = sqlite_utils.Database(conn)
        try:
            self.db.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            if self.db.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file: large pages (see PAGE_SIZE)
                self.db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")  # a committed turn survives power loss too
            # The WAL is copied into the database by a background thread after a save (see _checkpoint_soon), not
            # inside the next commit: a turn's save writes its new pieces once before it returns, not twice
            self.db.execute("PRAGMA wal_autocheckpoint = 0")
            self.db.execute("PRAGMA foreign_keys = ON")
            if self.db.execute("PRAGMA user_version").fetchone()[0] != len(MIGRATIONS):
                with self.transaction():  # the write lock first: two processes opening a new file migrate it once
                    migrate(self.db)
        except (sqlite3.DatabaseError, StoreError) as e:
            conn.close()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot open the memory database {self.path}: {e}") from e

    def _object_store(self, url: str | None) -> Objects | None:
        """The object store of this database's pieces (see __init__'s `objects`), recorded in it on first use: a
        database's pieces stay where its rows say they are."""
        recorded = self._setting("objects")
        if url is None:
            url = recorded or os.environ.get(ENV_OBJECTS) or ""
        url = normal_url(url)
        if recorded and url != recorded:
            raise StoreError(f"{self.path} keeps its snapshot pieces in {recorded}, not {url or 'the database'}")
        if not url:
            return None
        objects = Objects(url)  # a bad URL is refused before anything is recorded
        if not recorded:
            with self.transaction():  # the first to record wins; another URL recorded meanwhile is refused above
                self.db.execute("insert into settings (key, value) values ('objects', ?) on conflict do nothing", [url])
                self.db.execute("insert into settings (key, value) values ('objects_space', ?) on conflict do nothing",
                                [secrets.token_hex(8)])  # fmt: skip
            if self._setting("objects") != url:
                raise StoreError(f"{self.path} keeps its snapshot pieces in {self._setting('objects')}, not {url}")
        objects.space = self._setting("objects_space") or ""
        return objects

    def conversation_saver(self) -> Any:
        """LangGraph's saver of this database's conversation threads (memory/checkpoints.py), on a connection of its
        own: the agent's graph checkpoints through it while the store saves turns. Close its `conn` after use."""
        return checkpoints.open_saver(self._target, self._busy_timeout_ms / 1000)

    def another(self) -> Store:
        """A second connection to this database and its object store, for another thread (a Store is never used
        by two threads at once), with transactions of its own."""
        return Store(self._target, self._busy_timeout_ms, self.keep_last)

    def _setting(self, key: str) -> str | None:
        row = self.db.execute("select value from settings where key = ?", [key]).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        for sid in list(self._leases):  # sessions this process held through this store
            with contextlib.suppress(*pgdb.DB_ERRORS):
                self.release(sid)
        if self._checkpointer is not None:
            self._checkpointer.join()
        self.db.close()  # the last connection to close copies what is left of the WAL into the database

    def _checkpoint_soon(self) -> None:
        """Once the write-ahead log holds WAL_CHECKPOINT_BYTES, copy it into the database from a thread with its own
        connection (a passive checkpoint: readers and writers go on meanwhile). Committed data is safe either way."""
        if not self.sqlite:
            return
        try:
            wal = os.path.getsize(f"{self.path}-wal")
        except OSError:
            return
        if wal < WAL_CHECKPOINT_BYTES or (self._checkpointer is not None and self._checkpointer.is_alive()):
            return

        def checkpoint() -> None:
            try:
                conn = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    conn.close()
            except sqlite3.Error as e:  # the next one, or closing, does it
                log.warning("background checkpoint of %s failed: %s", self.path, e)

        self._checkpointer = threading.Thread(target=checkpoint, name="deltamem-checkpoint", daemon=True)
        self._checkpointer.start()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction, taking the write lock up front so it never fails half-way on a lock upgrade."""
        if self._in_transaction():
            with self.db.atomic():  # nested: a savepoint
                yield
            return
        try:
            self.db.execute("BEGIN IMMEDIATE" if self.sqlite else "BEGIN")
            if not self.sqlite:  # one writer at a time, as SQLite's write lock (memory/pgdb.py)
                self.db.execute("select pg_advisory_xact_lock(?)", [pgdb.WRITE_LOCK])
            yield
        except BaseException:
            if self._in_transaction():
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        if self._doomed:  # pieces this transaction marked 'deleting' (Retention._collect): their objects go now
            try:
                self._sweep()
            except (StoreError, *pgdb.DB_ERRORS) as e:  # committed all the same; the next sweep (gc) finishes it
                log.warning("could not delete unused pieces from the object store yet: %s", e)

    @contextlib.contextmanager
    def _read(self) -> Iterator[None]:
        """Several reads that see one consistent database (WAL: never blocked by a writer)."""
        if self._in_transaction():
            yield
            return
        self.db.execute("BEGIN" if self.sqlite else "BEGIN ISOLATION LEVEL REPEATABLE READ")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def _in_transaction(self) -> bool:
        return self.db.conn.in_transaction if self.sqlite else self.db.in_transaction

    def file_bytes(self) -> int:
        """The database's size on disk: the file and its write-ahead log (PostgreSQL: the database's size)."""
        if not self.sqlite:
            return self.db.execute("select pg_database_size(current_database())").fetchone()[0]
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

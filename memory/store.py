"""Store: sessions, turns, snapshots of model state and the ingest ledger, in one SQLite file (sqlite-utils, WAL).

A snapshot blob is stored as a prefix (its headers) plus content-addressed pieces (its tensors), so unchanged
attention-window pages are written once however many turns reference them. Every write that belongs together
(a turn, its snapshot and its ledger entries; a fork; a rewind) is one `BEGIN IMMEDIATE` transaction: a process
killed at any moment leaves the database at the last committed turn, and concurrent writers queue on the busy
timeout instead of failing with "database is locked".

Turns are numbered per session from 1 (`seq`). A snapshot is taken at a turn (`turn_seq`, the last turn it has
consumed); rewinding or forking is possible at turn 0 (the empty state) and at every turn that has a snapshot.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from deltamem.memory import checkpoints
from deltamem.memory import pieces as pc
from deltamem.memory.errors import Ambiguous, CorruptSnapshot, NotFound, SessionBusy, StoreError
from deltamem.memory.migrations import MIGRATIONS, migrate

ENV_DB = "DELTAMEM_DB"
TOKEN_CHUNK = 4096  # token ids per stored chunk: a turn rewrites only the last chunk of a session's ids
KEEP_LAST = 16  # snapshots kept per session (plus named ones) unless the session or the caller says otherwise
# Pages of a new database: snapshot pieces are blobs of megabytes, stored as chains of overflow pages; 64 KiB pages
# write (and free) such a chain in a sixteenth of the steps of SQLite's default 4 KiB (measured on an H200 host:
# a save of 126 MB of new pieces 250 ms -> 160 ms with the checkpoint below moved off the save)
PAGE_SIZE = 65536
WAL_CHECKPOINT_BYTES = 64 << 20
EXPORT_FORMAT = 2  # 1: store rows only; 2: + the graph thread (the conversation) and an export_info table

log = logging.getLogger("deltamem.memory")


LEASE_WAIT_S = 10.0  # how long a second process waits for a session another one holds ($DELTAMEM_LEASE_WAIT)


class Lease:
    """A held session (Store.lease); release() or a `with` block gives it back."""

    def __init__(self, store: Store, sid: str):
        self.store, self.sid = store, sid

    def release(self) -> None:
        self.store.release(self.sid)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _process() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid)}


def _start_time(pid: int) -> str:
    """The process's start time (Linux: /proc/PID/stat field 22), so a reused pid is not taken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(row: dict[str, Any]) -> bool:
    if row["host"] != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    try:
        os.kill(row["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not row["pid_start"] or _start_time(row["pid"]) == row["pid_start"]


def default_db_path() -> Path:
    """$DELTAMEM_DB, else $XDG_DATA_HOME/deltamem/memory.db (~/.local/share/deltamem/memory.db)."""
    if os.environ.get(ENV_DB):
        return Path(os.environ[ENV_DB])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "deltamem" / "memory.db"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Store:
    def __init__(self, path: str | Path | None = None, busy_timeout_ms: int = 30_000, keep_last: int = KEEP_LAST):
        self.path = Path(path) if path is not None else default_db_path()
        self.keep_last = keep_last
        # the last save_turn's snapshot: bytes in all, bytes new to the store (written), seconds to save and commit
        self.last_save: dict[str, Any] = {}
        self._leases: set[str] = set()  # sessions leased through this store, released at close()
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
        self._busy_timeout_ms = busy_timeout_ms
        self._checkpointer: threading.Thread | None = None
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
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"cannot open the memory database {self.path}: {e}") from e
        except StoreError:
            conn.close()
            raise

    def close(self) -> None:
        for sid in list(self._leases):  # sessions this process held through this store
            with contextlib.suppress(sqlite3.Error):
                self.release(sid)
        if self._checkpointer is not None:
            self._checkpointer.join()
        self.db.close()  # the last connection to close copies what is left of the WAL into the database

    def _checkpoint_soon(self) -> None:
        """Once the write-ahead log holds WAL_CHECKPOINT_BYTES, copy it into the database from a thread with its own
        connection (a passive checkpoint: readers and writers go on meanwhile). Committed data is safe either way."""
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
        if self.db.conn.in_transaction:
            with self.db.atomic():  # nested: a savepoint
                yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.conn.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[None]:
        """Several reads that see one consistent database (WAL: never blocked by a writer)."""
        if self.db.conn.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    # --- projects and sessions -----------------------------------------------------------------------------
    def project(self, root: str | Path, name: str | None = None) -> int:
        """The id of the project at `root`, made if it is new."""
        with self.transaction():
            pid = self.project_id(root)
            if pid is not None:
                return pid
            root = str(Path(root).resolve())
            return (
                self.db["projects"].insert({"root": root, "name": name or Path(root).name, "created": _now()}).last_pk
            )

    def project_id(self, root: str | Path) -> int | None:
        """The id of the project at `root`, or None (nothing is written)."""
        row = next(self.db["projects"].rows_where("root = ?", [str(Path(root).resolve())]), None)
        return row["id"] if row else None

    def create_session(self, title: str, fingerprint: str, project_id: int | None = None) -> str:
        if not title.strip():
            raise StoreError("a session needs a non-empty title")
        sid = uuid.uuid4().hex[:12]
        now = _now()
        with self.transaction():
            self.db["sessions"].insert(
                {
                    "id": sid,
                    "project_id": project_id,
                    "title": title,
                    "fingerprint": fingerprint,
                    "created": now,
                    "updated": now,
                }
            )
        return sid

    def session(self, ref: str, project_id: int | None = None) -> dict[str, Any]:
        """A session by id, title, or unique id prefix (4+ characters). With `project_id`, titles and id prefixes
        match only that project's sessions (an exact id matches anywhere): the same folder name in two places is two
        sessions. Raises NotFound, or Ambiguous listing the candidates."""
        rows = list(self.db["sessions"].rows_where("id = ?", [ref]))
        scope, args = ("and project_id = ?", [project_id]) if project_id is not None else ("", [])
        rows = rows or list(self.db["sessions"].rows_where(f"title = ? {scope}", [ref, *args]))
        if not rows and len(ref) >= 4:
            rows = list(self.db["sessions"].rows_where(f"id like ? escape '\\' {scope}", [_like_prefix(ref), *args]))
        if not rows:
            raise NotFound(f"no session {ref!r} (see `deltamem sessions list`)")
        if len(rows) > 1:
            roots = {r["id"]: r["root"] for r in self.db.query("select id, root from projects")}
            raise _ambiguous(ref, [{**r, "root": roots.get(r["project_id"])} for r in rows], "use the id")
        return rows[0]

    def adopt(self, title: str, project_id: int) -> dict[str, Any] | None:
        """The session titled `title` whose project folder is not on this machine (an imported session, or a moved
        repository) or that has no project, now made this project's; None if there is none. Several: Ambiguous."""
        rows = [
            r
            for r in self.db.query(
                "select s.*, p.root from sessions s left join projects p on p.id = s.project_id where s.title = ?",
                [title],
            )
            if r["project_id"] != project_id and (r["root"] is None or not Path(r["root"]).is_dir())
        ]
        if len(rows) > 1:
            raise _ambiguous(title, rows, "none of their folders is on this machine; use the id")
        return self.move(rows[0]["id"], project_id) if rows else None

    def move(self, sid: str, project_id: int) -> dict[str, Any]:
        """Make a session another project's (its folder moved, or it came from another machine), and say so."""
        with self.transaction():
            self.db["sessions"].update(sid, {"project_id": project_id, "updated": _now()})
        sess = self.session(sid)
        root = self.db["projects"].get(project_id)["root"]
        log.warning("session %s (%r) now belongs to the project at %s", sid, sess["title"], root)
        return sess

    def sessions(self, project_id: int | None = None) -> list[dict[str, Any]]:
        """Every session (or a project's) with turns, tokens seen and latest snapshot size, most recent first."""
        where = "where s.project_id = ?" if project_id is not None else ""
        return list(
            self.db.query(
                f"""
                select s.*, p.root as project, p.name as project_name,
                  (select count(*) from turns t where t.session_id = s.id) as turns,
                  (select count(*) from session_snapshots ss where ss.session_id = s.id) as snapshots,
                  last.tokens_seen, last.bytes as snapshot_bytes
                from sessions s left join projects p on p.id = s.project_id
                left join snapshots last on last.id = (
                  select ss.snapshot_id from session_snapshots ss where ss.session_id = s.id
                  order by ss.turn_seq desc, ss.snapshot_id desc limit 1)
                {where}
                order by s.updated desc, s.id
                """,
                [project_id] if project_id is not None else [],
            )
        )

    def rename(self, ref: str, title: str) -> None:
        if not title.strip():
            raise StoreError("a session needs a non-empty title")
        sid = self.session(ref)["id"]
        with self.transaction():
            self.db["sessions"].update(sid, {"title": title, "updated": _now()})

    def set_keep_last(self, ref: str, keep_last: int | None) -> None:
        """This session's retention (None: the store's default)."""
        if keep_last is not None and keep_last < 1:
            raise StoreError("keep_last must be >= 1")
        sid = self.session(ref)["id"]
        with self.transaction():
            self.db["sessions"].update(sid, {"keep_last": keep_last})

    def turns(self, ref: str) -> list[dict[str, Any]]:
        sid = self.session(ref)["id"]
        return list(self.db["turns"].rows_where("session_id = ?", [sid], order_by="seq"))

    # --- turns and snapshots -------------------------------------------------------------------------------
    def save_turn(
        self,
        ref: str,
        turns: Iterable[dict[str, Any]],
        snapshot: bytes | None = None,
        *,
        name: str | None = None,
        ingested: Iterable[dict[str, Any]] = (),
        checkpoint_id: str | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> int | None:
        """Append turns (dicts: role, text, tokens, tool_calls), the ledger entries of files they read (dicts: path,
        sha256 (None: removed), mtime, bytes, tokens, text) and the snapshot taken after them, in one transaction;
        then apply the session's retention. `token_ids`: every id the snapshot's state has consumed, kept with it
        (in shared chunks) so a resumed session can check its prompt against them. Returns the snapshot id (None
        without a snapshot)."""
        turns = list(turns)
        if snapshot is not None and not turns:
            raise StoreError("a snapshot is saved with the turn that produced it; got no turn")
        t0 = time.perf_counter()
        try:
            if snapshot is None:
                split = None
            elif hasattr(snapshot, "prefix"):  # already in parts, hashed by its maker (Engine.snapshot_parts)
                split = pc.from_parts(snapshot.prefix, snapshot.pieces)
            else:
                split = pc.split(snapshot)
        except pc.BlobError as e:
            raise CorruptSnapshot(f"refusing to store a bad snapshot: {e}") from e
        with self.transaction():
            sess = self.session(ref)
            if split is not None and split.header.get("fingerprint") != sess["fingerprint"]:
                raise StoreError(
                    f"snapshot is of model {split.header.get('fingerprint')}; session {sess['id']} uses "
                    f"{sess['fingerprint']}"
                )
            seq = self.db.execute(
                "select coalesce(max(seq), 0) from turns where session_id = ?", [sess["id"]]
            ).fetchone()[0]
            now = _now()
            for t in turns:
                if not t.get("role"):
                    raise StoreError("every turn needs a role")
                seq += 1
                self.db["turns"].insert(
                    {
                        "session_id": sess["id"],
                        "seq": seq,
                        "role": t["role"],
                        "text": t.get("text") or "",
                        "tokens": t.get("tokens"),
                        "tool_calls": json.dumps(t["tool_calls"]) if t.get("tool_calls") else None,
                        "created": now,
                    }
                )
            for f in ingested:
                self.db["ingested"].insert(
                    {
                        "session_id": sess["id"],
                        "turn_seq": seq,
                        "path": f["path"],
                        "sha256": f.get("sha256"),
                        "mtime": f.get("mtime"),
                        "bytes": f.get("bytes"),
                        "tokens": f.get("tokens"),
                        "text": f.get("text"),
                        "converter": f.get("converter"),
                    }
                )
            snap_id = None
            if split is not None:
                row = {
                    "fingerprint": split.header.get("fingerprint"),
                    "tokens_seen": split.header.get("tokens_seen"),
                    "bytes": len(split.prefix) + sum(len(d) for _, d in split.pieces),
                    "sha256": split.header.get("sha256"),  # the snapshot's own digest of its header + payload
                    "prefix_sha256": hashlib.sha256(split.prefix).hexdigest(),
                    "prefix": split.prefix,
                    "created": now,
                }
                tokens = _token_chunks(token_ids) if token_ids is not None else []
                snap_id = self._insert_snapshot(split.pieces, row, tokens)
                t_insert = time.perf_counter()
                self.db["session_snapshots"].insert(
                    {
                        "session_id": sess["id"],
                        "snapshot_id": snap_id,
                        "turn_seq": seq,
                        "name": name,
                        "checkpoint_id": checkpoint_id,
                    }
                )
                self._retain(sess["id"], sess["keep_last"] or self.keep_last)
                t_retain = time.perf_counter()
            self.db["sessions"].update(sess["id"], {"updated": now})
        if split is not None:
            t_end = time.perf_counter()
            self.last_save.update(  # committed (and synced) included; retention: older snapshots dropped
                seconds=t_end - t0, insert_s=t_insert - t0, retain_s=t_retain - t_insert, commit_s=t_end - t_retain
            )
            self._checkpoint_soon()
        return snap_id

    def _insert_snapshot(
        self, pieces: list[tuple[str, bytes]], row: dict[str, Any], tokens: list[tuple[str, bytes]]
    ) -> int:
        """Store a snapshot row, its pieces and its token chunks: only the pieces not stored yet are written
        (`last_save` says how many bytes that was)."""
        new_bytes = 0
        parts = [*pieces, *tokens]
        have = set()
        for i in range(0, len(parts), 500):
            batch = [d for d, _ in parts[i : i + 500]]
            marks = ",".join("?" * len(batch))
            have.update(r[0] for r in self.db.execute(f"select sha256 from pieces where sha256 in ({marks})", batch))
        for digest, data in parts:
            if digest in have:
                continue
            have.add(digest)
            self.db.execute("insert into pieces (sha256, bytes, data) values (?, ?, ?)", [digest, len(data), data])
            new_bytes += len(data)
        self.last_save = {"bytes": row["bytes"], "new_bytes": new_bytes}
        snap_id = self.db["snapshots"].insert(row).last_pk
        for table, parts in (("snapshot_pieces", pieces), ("snapshot_tokens", tokens)):
            self.db[table].insert_all({"snapshot_id": snap_id, "idx": i, "sha256": d} for i, (d, _) in enumerate(parts))
        return snap_id

    def snapshots(self, ref: str) -> list[dict[str, Any]]:
        """The session's snapshots, oldest first: id, turn_seq, name, tokens_seen, bytes, created, checkpoint_id."""
        sid = self.session(ref)["id"]
        return list(
            self.db.query(
                """select sn.id, ss.turn_seq, ss.name, sn.tokens_seen, sn.bytes, sn.created, ss.checkpoint_id
                   from session_snapshots ss join snapshots sn on sn.id = ss.snapshot_id
                   where ss.session_id = ? order by ss.turn_seq, sn.id""",
                [sid],
            )
        )

    def load_snapshot(self, ref: str, snapshot_id: int | None = None, joined: bool = True) -> bytes | list[bytes]:
        """The session's latest snapshot (or a given one of its own), verified by hash: its bytes, or with
        joined=False the same bytes in parts, [headers, tensor, tensor, ...] (Engine.restore takes either; a
        large state then skips one copy of itself)."""
        with self._read():
            rows = self.snapshots(ref)
            if snapshot_id is not None:
                rows = [r for r in rows if r["id"] == snapshot_id]
            if not rows:
                raise NotFound(f"session {ref!r} has no snapshot" + (f" {snapshot_id}" if snapshot_id else ""))
            return self._blob(rows[-1]["id"], joined)

    def load_tokens(self, ref: str, snapshot_id: int) -> list[int] | None:
        """The token ids one of the session's snapshots has consumed (None if it was saved without them)."""
        with self._read():
            if not any(r["id"] == snapshot_id for r in self.snapshots(ref)):
                raise NotFound(f"session {ref!r} has no snapshot {snapshot_id}")
            parts = _piece_rows(self.db, snapshot_id, "snapshot_tokens")
        if not parts:
            row = self.db["snapshots"].get(snapshot_id)
            return [] if row["tokens_seen"] == 0 else None
        if any(d is None for _, d in parts):
            raise CorruptSnapshot(f"snapshot {snapshot_id} lacks some of its stored token chunks")
        try:
            data = pc.join(b"", parts)
        except pc.BlobError as e:
            raise CorruptSnapshot(f"snapshot {snapshot_id} token ids: {e}") from e
        ids = array.array("i")
        ids.frombytes(data)
        if sys.byteorder == "big":
            ids.byteswap()
        return ids.tolist()

    def _blob(self, snapshot_id: int, joined: bool = True) -> bytes | list[bytes]:
        row = self.db["snapshots"].get(snapshot_id)
        parts = _piece_rows(self.db, snapshot_id)
        missing = sum(d is None for _, d in parts)
        if missing:
            raise CorruptSnapshot(f"snapshot {snapshot_id} lacks {missing} of its stored pieces")
        try:
            pc.verify(parts)
        except pc.BlobError as e:
            raise CorruptSnapshot(f"snapshot {snapshot_id}: {e}") from e
        # Each piece was checked against its hash by verify(); the headers against theirs: together, every byte.
        if hashlib.sha256(row["prefix"]).hexdigest() != row["prefix_sha256"]:
            raise CorruptSnapshot(f"snapshot {snapshot_id}: its stored headers are corrupt (hash mismatch)")
        datas = [row["prefix"], *(d for _, d in parts)]
        return b"".join(datas) if joined else datas

    def name_snapshot(self, ref: str, snapshot_id: int, name: str | None) -> None:
        """Pin (or with None, unpin) one of the session's snapshots: named ones survive retention."""
        sid = self.session(ref)["id"]
        with self.transaction():
            cur = self.db.execute(
                "update session_snapshots set name = ? where session_id = ? and snapshot_id = ?",
                [name, sid, snapshot_id],
            )
            if cur.rowcount == 0:
                raise NotFound(f"session {sid} has no snapshot {snapshot_id}")

    # --- fork, rewind, delete, retention -------------------------------------------------------------------
    def check_resume_point(self, sid: str, turn: int | None) -> int:
        """Validate a turn to fork or rewind at: 0, or a turn that has a snapshot (default: the latest one)."""
        points = [s["turn_seq"] for s in self.snapshots(sid)]
        if turn is None:
            return max(points, default=0)
        if turn != 0 and turn not in points:
            have = ", ".join(map(str, sorted(set(points)))) or "none"
            raise NotFound(f"session {sid} has no snapshot at turn {turn} (0 and the turns with one: {have})")
        return turn

    def fork(self, ref: str, at_turn: int | None = None, title: str | None = None) -> str:
        """A new session holding the turns up to `at_turn` (default: the latest snapshot), the snapshots and ledger
        up to it; snapshot rows are shared, not copied."""
        with self.transaction():
            src = self.session(ref)
            last = self.check_resume_point(src["id"], at_turn)
            snaps = [s for s in self.snapshots(src["id"]) if s["turn_seq"] <= last]
            new = self.create_session(title or f"{src['title']} (fork)", src["fingerprint"], src["project_id"])
            self.db["sessions"].update(
                new,
                {
                    "parent_id": src["id"],
                    "parent_snapshot_id": snaps[-1]["id"] if snaps else None,
                    "keep_last": src["keep_last"],
                },
            )
            self.db.execute(
                """insert into turns (session_id, seq, role, text, tokens, tool_calls, created)
                   select ?, seq, role, text, tokens, tool_calls, created from turns
                   where session_id = ? and seq <= ? order by seq""",
                [new, src["id"], last],
            )
            self.db.execute(
                """insert into ingested (session_id, turn_seq, path, sha256, mtime, bytes, tokens, text)
                   select ?, turn_seq, path, sha256, mtime, bytes, tokens, text from ingested
                   where session_id = ? and turn_seq <= ? order by id""",
                [new, src["id"], last],
            )
            self.db["session_snapshots"].insert_all(
                {
                    "session_id": new,
                    "snapshot_id": s["id"],
                    "turn_seq": s["turn_seq"],
                    "name": s["name"],
                    "checkpoint_id": s["checkpoint_id"],
                }
                for s in snaps
            )
        return new

    def rewind(self, ref: str, to_turn: int) -> None:
        """Drop the turns, ledger entries and snapshots after `to_turn`; blobs no session uses are deleted."""
        with self.transaction():
            sid = self.session(ref)["id"]
            last = self.check_resume_point(sid, to_turn)
            for table, col in (("turns", "seq"), ("ingested", "turn_seq"), ("session_snapshots", "turn_seq")):
                self.db.execute(f"delete from {table} where session_id = ? and {col} > ?", [sid, last])
            self.db["sessions"].update(sid, {"updated": _now()})
            self._collect()

    def delete(self, ref: str) -> None:
        with self.transaction():
            sid = self.session(ref)["id"]
            for table in ("session_snapshots", "turns", "ingested", "leases"):
                self.db.execute(f"delete from {table} where session_id = ?", [sid])
            self.db.execute("update sessions set parent_id = null where parent_id = ?", [sid])
            self.db.execute("delete from sessions where id = ?", [sid])
            self._collect()

    def retain(self, ref: str, keep_last: int) -> None:
        """Keep the session's last `keep_last` snapshots and its named ones; delete the rest no one else uses."""
        with self.transaction():
            self._retain(self.session(ref)["id"], keep_last)

    def _retain(self, sid: str, keep_last: int) -> None:
        snaps = self.snapshots(sid)
        drop = [s["id"] for s in snaps[: max(0, len(snaps) - keep_last)] if not s["name"]]
        for snap_id in drop:
            self.db.execute("delete from session_snapshots where session_id = ? and snapshot_id = ?", [sid, snap_id])
        if drop:
            self._collect(drop)
        self._prune_thread(sid)

    def trim(self, title_prefix: str, max_bytes: int, recency: dict[int, float] | None = None,
             spare: str | None = None) -> list[int]:  # fmt: skip
        """Keep the sessions titled `title_prefix`... within max_bytes of pieces (what their snapshots' pieces take
        in the file, each piece once): their snapshots are dropped least recently used first until they fit, but
        each session's latest snapshot (what its next turn resumes) and its named ones stay, except the latest of
        sessions titled `spare`... recency: snapshot id -> when this process last used it; the others count as
        older, oldest created first. Returns the ids dropped (deleted where no other session holds them); `gc`
        gives their space back to the file system."""
        rows = self.db.execute(
            """select ss.session_id, ss.snapshot_id, ss.name, sn.created, s.title from session_snapshots ss
               join snapshots sn on sn.id = ss.snapshot_id join sessions s on s.id = ss.session_id
               where substr(s.title, 1, ?) = ? order by ss.session_id, ss.turn_seq, sn.id""",
            [len(title_prefix), title_prefix],
        ).fetchall()
        # rows in turn order: the last one of each session, where it is kept
        latest = {sid: snap for sid, snap, _, _, title in rows if not (spare and title.startswith(spare))}
        recency = recency or {}
        candidates = sorted(((sid, snap, created) for sid, snap, name, created, _ in rows
                             if not name and latest.get(sid) != snap),
                            key=lambda r: (r[1] in recency, recency.get(r[1], 0.0), r[2], r[1]))  # fmt: skip
        dropped: list[int] = []
        with self.transaction():
            for sid, snap, _ in candidates:
                if self._states_bytes(title_prefix) <= max_bytes:
                    break
                self.db.execute("delete from session_snapshots where session_id = ? and snapshot_id = ?", [sid, snap])
                self._collect([snap])
                dropped.append(snap)
        return dropped

    def _states_bytes(self, title_prefix: str) -> int:
        used = """select sha256 from snapshot_pieces where snapshot_id in (%s) union
                  select sha256 from snapshot_tokens where snapshot_id in (%s)"""
        snaps = """select ss.snapshot_id from session_snapshots ss join sessions s on s.id = ss.session_id
                   where substr(s.title, 1, :n) = :prefix"""
        return self.db.execute(f"select coalesce(sum(bytes), 0) from pieces where sha256 in ({used % (snaps, snaps)})",
                               {"n": len(title_prefix), "prefix": title_prefix}).fetchone()[0]  # fmt: skip

    def _prune_thread(self, sid: str) -> int:
        """Drop the session's graph checkpoints that no kept snapshot points to (see memory/checkpoints.py)."""
        if not checkpoints.present(self.db):
            return 0
        keep = {s["checkpoint_id"] for s in self.snapshots(sid) if s["checkpoint_id"]}
        return checkpoints.prune(self.db, sid, keep)

    def _collect(self, candidates: list[int] | None = None) -> dict[str, int]:
        """Delete snapshots no session references (among `candidates`, or all) and pieces no snapshot uses."""
        scope = f"and id in ({','.join('?' * len(candidates))})" if candidates is not None else ""
        orphans = [
            r[0]
            for r in self.db.execute(
                f"select id from snapshots where id not in (select snapshot_id from session_snapshots) {scope}",
                candidates or [],
            ).fetchall()
        ]
        n_pieces = 0
        used = "(select sha256 from snapshot_pieces union all select sha256 from snapshot_tokens)"
        for snap_id in orphans:
            digests = {
                r[0]
                for table in ("snapshot_pieces", "snapshot_tokens")
                for r in self.db.execute(f"select sha256 from {table} where snapshot_id = ?", [snap_id]).fetchall()
            }
            for table in ("snapshot_pieces", "snapshot_tokens"):
                self.db.execute(f"delete from {table} where snapshot_id = ?", [snap_id])
            self.db.execute("delete from snapshots where id = ?", [snap_id])
            for d in digests:
                n_pieces += self.db.execute(
                    "delete from pieces where sha256 = :d"
                    " and not exists (select 1 from snapshot_pieces where sha256 = :d)"
                    " and not exists (select 1 from snapshot_tokens where sha256 = :d)",
                    {"d": d},
                ).rowcount
        if candidates is None:  # pieces left by an older, interrupted layout: none expected, cheap to check
            n_pieces += self.db.execute(f"delete from pieces where sha256 not in {used}").rowcount
        return {"snapshots": len(orphans), "pieces": n_pieces}

    def gc(self) -> dict[str, int]:
        """Delete every snapshot no session references, every piece no snapshot uses and every graph checkpoint no
        kept snapshot points to (a deleted session's included); then give the space back to the file system
        (VACUUM). Returns what was removed and the file's bytes before and after."""
        before = self.file_bytes()
        with self.transaction():
            removed = self._collect()
            removed["checkpoints"] = 0
            if checkpoints.present(self.db):
                removed["checkpoints"] = checkpoints.drop_orphans(self.db)
                sids = [r[0] for r in self.db.execute("select id from sessions").fetchall()]
                removed["checkpoints"] += sum(self._prune_thread(sid) for sid in sids)
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {**removed, "bytes_before": before, "bytes_after": self.file_bytes()}

    def file_bytes(self) -> int:
        """The database's size on disk: the file and its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    # --- leases: one writer per session ---------------------------------------------------------------------
    def lease(self, ref: str, command: str = "", wait_s: float | None = None) -> Lease:
        """Hold the session for this process until release() (or exit): a second process asking for it waits up to
        `wait_s`, then gets SessionBusy naming the holder. A lease whose process is gone (same host: its pid no longer
        runs, or runs another program) is taken over. The same process may ask again (one lease per process)."""
        sid = self.session(ref)["id"]
        me = _process()
        if wait_s is None:
            wait_s = float(os.environ.get("DELTAMEM_LEASE_WAIT", LEASE_WAIT_S))
        deadline = time.monotonic() + wait_s
        while True:
            with self.transaction():
                row = self.db["leases"].get(sid) if self.db["leases"].count_where("session_id = ?", [sid]) else None
                mine = row is not None and (row["host"], row["pid"], row["pid_start"]) == (me["host"], me["pid"],
                                                                                           me["pid_start"])
                if row is None or mine or not _alive(row):
                    if row is not None and not mine:
                        log.warning("taking over session %s from process %s on %s, which is gone", sid, row["pid"],
                                    row["host"])
                    self.db["leases"].upsert({"session_id": sid, **me, "command": command, "acquired": time.time()},
                                             pk="session_id")
                    self._leases.add(sid)
                    return Lease(self, sid)
            if time.monotonic() >= deadline:
                since = datetime.fromtimestamp(row["acquired"]).strftime("%Y-%m-%d %H:%M:%S")
                raise SessionBusy(
                    f"session {ref!r} is in use by {row['command'] or 'another deltamem'} (pid {row['pid']} on "
                    f"{row['host']}, since {since}); wait for it to finish, stop it, or fork the session"
                )
            time.sleep(0.2)

    def release(self, sid: str) -> None:
        self._leases.discard(sid)
        me = _process()
        with self.transaction():
            self.db.execute(
                "delete from leases where session_id = ? and host = ? and pid = ? and pid_start = ?",
                [sid, me["host"], me["pid"], me["pid_start"]],
            )

    # --- ingest ledger and recall --------------------------------------------------------------------------
    def ingested(self, ref: str) -> dict[str, dict[str, Any]]:
        """The ledger as the session's state knows it: path -> latest entry (path, sha256, mtime, bytes, tokens,
        turn_seq, converter), removed files left out."""
        sid = self.session(ref)["id"]
        rows = self.db.query(
            """select path, sha256, mtime, bytes, tokens, turn_seq, converter from ingested i
               where session_id = ? and turn_seq = (
                 select max(turn_seq) from ingested j where j.session_id = i.session_id and j.path = i.path)
               order by path""",
            [sid],
        )
        return {r["path"]: r for r in rows if r["sha256"] is not None}

    def search(self, ref: str, query: str, limit: int = 10) -> list[dict[str, Any]]:
        """Full-text search over the session's turns and the latest text of its ingested files: exact recall of
        what fell out of the attention window. Hits: kind ('turn' or 'file'), seq or path, snippet."""
        sid = self.session(ref)["id"]
        try:
            return list(
                self.db.query(
                    """select * from (
                         select 'turn' as kind, t.seq, t.role as path, t.role,
                           snippet(turns_fts, 0, '[', ']', '…', 12) as snippet, turns_fts.rank as rank
                         from turns_fts join turns t on t.rowid = turns_fts.rowid
                         where turns_fts match :q and t.session_id = :sid
                         union all
                         select 'file', i.turn_seq, i.path, null,
                           snippet(ingested_fts, 1, '[', ']', '…', 12), ingested_fts.rank
                         from ingested_fts join ingested i on i.rowid = ingested_fts.rowid
                         where ingested_fts match :q and i.session_id = :sid and i.sha256 is not null
                           and i.turn_seq = (select max(turn_seq) from ingested j
                                             where j.session_id = i.session_id and j.path = i.path)
                       ) order by rank limit :limit""",
                    {"q": query, "sid": sid, "limit": limit},
                )
            )
        except sqlite3.OperationalError as e:
            raise StoreError(f"bad search query {query!r}: {e}") from e

    # --- export and import ---------------------------------------------------------------------------------
    def export(self, ref: str, path: str | Path) -> dict[str, Any]:
        """Write one session (turns, snapshots, ledger) to a new portable file: a deltamem database holding only
        that session. Written beside the target and renamed into place, so a failure leaves no partial file."""
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path} already exists; choose another file name")
        sess = self.session(ref)
        if not path.parent.is_dir():
            raise StoreError(f"cannot write {path}: {path.parent} is not a directory")
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
            os.close(fd)
            Path(tmp).unlink()
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e}") from e
        try:
            with Store(tmp) as out, self._read():
                _copy_session(self, out, sess["id"], new_id=sess["id"])
                conversation = 0
                if checkpoints.present(self.db):  # the graph thread up to the exported point: the latest snapshot's
                    snaps = [r for r in self.snapshots(sess["id"]) if r["checkpoint_id"]]
                    if snaps:
                        checkpoints.create_like(self.db, out.db)
                        with out.transaction():
                            conversation = checkpoints.copy(
                                self.db, out.db, sess["id"], sess["id"], upto=snaps[-1]["checkpoint_id"]
                            )
                out.db["export_info"].insert_all(
                    [{"key": "format", "value": str(EXPORT_FORMAT)}, {"key": "session", "value": sess["id"]}],
                    pk="key",
                )
                out.db.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            os.replace(tmp, path)
        except BaseException:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
                Path(leftover).unlink(missing_ok=True)
            raise
        return {
            "session": sess["id"],
            "path": str(path),
            "bytes": path.stat().st_size,
            "format": EXPORT_FORMAT,
            "checkpoints": conversation,
        }

    def import_(self, path: str | Path, fingerprint: str | None = None) -> str:
        """Import a session exported by `export`, after checking every snapshot against its hashes and the
        session's model fingerprint (and `fingerprint`, if given). On any error nothing is written."""
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no such file")
        with tempfile.TemporaryDirectory() as tmpdir:
            copy = Path(tmpdir) / "import.db"
            shutil.copyfile(path, copy)  # the user's file is never modified (an old one gets upgraded here)
            try:
                src = Store(copy)
            except StoreError as e:
                raise StoreError(f"cannot import {path}: {e}") from e
            with src:
                try:
                    return self._import_from(src, path, fingerprint)
                except (sqlite3.Error, pc.BlobError) as e:
                    raise StoreError(f"{path} is not a valid deltamem export: {e}") from e

    def _import_from(self, src: Store, path: Path, fingerprint: str | None) -> str:
        fmt = 1
        if "export_info" in src.db.table_names():
            row = next(src.db["export_info"].rows_where("key = 'format'"), None)
            if row is None or not str(row["value"]).isdigit():
                raise StoreError(f"{path} is not a valid deltamem export: its export_info has no format number")
            fmt = int(row["value"])
        if fmt > EXPORT_FORMAT:
            raise StoreError(
                f"{path} is export format {fmt}, newer than this deltamem knows ({EXPORT_FORMAT}); upgrade deltamem"
            )
        rows = src.sessions()
        if len(rows) != 1:
            raise StoreError(f"{path} is not a deltamem export (it holds {len(rows)} sessions)")
        sess = rows[0]
        if fingerprint is not None and sess["fingerprint"] != fingerprint:
            raise StoreError(
                f"session {sess['id']} was saved with model {sess['fingerprint']}; this model is {fingerprint}"
            )
        for snap in src.snapshots(sess["id"]):
            blob = src._blob(snap["id"])
            src.load_tokens(sess["id"], snap["id"])  # its token chunks check out too
            header = pc.split(blob).header
            if header.get("fingerprint") != sess["fingerprint"]:
                raise StoreError(
                    f"{path}: snapshot {snap['id']} is of model {header.get('fingerprint')}, not of its "
                    f"session's model {sess['fingerprint']}"
                )
        with self.transaction():
            if next(self.db["sessions"].rows_where("id = ?", [sess["id"]]), None):
                raise StoreError(f"session {sess['id']} already exists here; delete it first to re-import")
            _copy_session(src, self, sess["id"], new_id=sess["id"])
            if checkpoints.present(src.db):  # the conversation, in the same transaction
                try:
                    checkpoints.create_like(src.db, self.db)
                except ValueError as e:
                    raise StoreError(f"{path} is not a valid deltamem export: {e}") from None
                for table in checkpoints.TABLES:  # a deleted session's thread left behind is not this session's
                    self.db.execute(f"delete from {table} where thread_id = ?", [sess["id"]])
                checkpoints.copy(src.db, self.db, sess["id"], sess["id"])
        if fmt < 2:
            log.warning(
                "%s was exported by an older deltamem (format %d) without its conversation: the session's next run "
                "starts the model state afresh. Export it again with this version to keep both.",
                path,
                fmt,
            )
        return sess["id"]


def _copy_session(src: Store, dst: Store, sid: str, new_id: str) -> None:
    """Copy a session with its turns, ledger, snapshots and their pieces from one store to another (inside
    the caller's transactions)."""
    sess = src.session(sid)
    project_id = None
    if sess["project_id"] is not None:
        proj = src.db["projects"].get(sess["project_id"])
        project_id = dst.project(proj["root"], proj["name"])
    with dst.transaction():
        dst.db["sessions"].insert(
            {**sess, "id": new_id, "project_id": project_id, "parent_id": None, "parent_snapshot_id": None}
        )
        dst.db["turns"].insert_all(
            {k: v for k, v in t.items() if k != "id"} | {"session_id": new_id} for t in src.turns(sid)
        )
        dst.db["ingested"].insert_all(
            {k: v for k, v in r.items() if k != "id"} | {"session_id": new_id}
            for r in src.db["ingested"].rows_where("session_id = ?", [sid], order_by="id")
        )
        for snap in src.snapshots(sid):
            row = src.db["snapshots"].get(snap["id"])
            new_snap = dst._insert_snapshot(
                _piece_rows(src.db, snap["id"]),
                {k: v for k, v in row.items() if k != "id"},
                _piece_rows(src.db, snap["id"], "snapshot_tokens"),
            )
            dst.db["session_snapshots"].insert(
                {
                    "session_id": new_id,
                    "snapshot_id": new_snap,
                    "turn_seq": snap["turn_seq"],
                    "name": snap["name"],
                    "checkpoint_id": snap["checkpoint_id"],
                }
            )


def _piece_rows(
    db: sqlite_utils.Database, snapshot_id: int, table: str = "snapshot_pieces"
) -> list[tuple[str, bytes | None]]:
    """A snapshot's pieces (or token chunks) in order: (sha256, bytes, or None where the piece is missing)."""
    return db.execute(
        f"""select sp.sha256, cast(p.data as blob) from {table} sp
            left join pieces p on p.sha256 = sp.sha256 where sp.snapshot_id = ? order by sp.idx""",
        [snapshot_id],
    ).fetchall()


def _token_chunks(ids: Sequence[int]) -> list[tuple[str, bytes]]:
    """Token ids as int32 little-endian chunks of TOKEN_CHUNK, keyed by sha256."""
    arr = array.array("i", ids)
    if sys.byteorder == "big":
        arr.byteswap()
    data = arr.tobytes()
    step = 4 * TOKEN_CHUNK
    return [(hashlib.sha256(c).hexdigest(), c) for c in (data[i : i + step] for i in range(0, len(data), step))]


def _ambiguous(ref: str, rows: list[dict[str, Any]], hint: str) -> Ambiguous:
    """The error for a reference that matches several sessions (rows: sessions with their project's `root`)."""
    found = [{"id": r["id"], "title": r["title"], "project": r["root"]} for r in rows]
    listed = "; ".join(f"{c['id']} {c['title']!r} in {c['project'] or '(no project)'}" for c in found)
    return Ambiguous(f"{ref!r} matches {len(rows)} sessions: {listed}; {hint}", found)


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"

"""Leases (a part of Store): one writer per session. A process holds a session while it writes to it; a second one
waits, then gets SessionBusy naming the holder. A lease whose process is gone is taken over. Written as methods of
`Leases`, a base class of Store (memory/store.py), which releases its leases when it closes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from deltamem.memory.errors import SessionBusy

log = logging.getLogger("deltamem.memory")

LEASE_KEY = "deltamem-lease:"  # PostgreSQL: the advisory lock of a session's lease is keyed by a hash of this + id
LEASE_WAIT_S = 10.0  # how long a second process waits for a session another one holds ($DELTAMEM_LEASE_WAIT)


class Lease:
    """A held session (Store.lease); release() or a `with` block gives it back."""

    def __init__(self, store: Leases, sid: str):
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


class Leases:
    """Session leases, as Store methods (they use its `db`, `transaction()` and `session()`)."""

    _leases: set[str]  # sessions leased through this store (Store.__init__ makes it, close() releases them)

    def lease(self, ref: str, command: str = "", wait_s: float | None = None) -> Lease:
        """Hold the session for this process until release() (or exit): a second process asking for it waits up to
        `wait_s`, then gets SessionBusy naming the holder. A lease whose process is gone (same host: its pid no longer
        runs, or runs another program) is taken over. The same process may ask again (one lease per process)."""
        sid = self.session(ref)["id"]
        me = _process()
        if wait_s is None:
            wait_s = float(os.environ.get("DELTAMEM_LEASE_WAIT", LEASE_WAIT_S))
        deadline = time.monotonic() + wait_s
        if not self.sqlite:
            return self._lease_pg(sid, ref, me, command, deadline)
        while True:
            with self.transaction():
                row = self.db["leases"].get(sid) if self.db["leases"].count_where("session_id = ?", [sid]) else None
                mine = row is not None and all(row[k] == me[k] for k in ("host", "pid", "pid_start"))
                if row is None or mine or not _alive(row):
                    if row is not None and not mine:
                        log.warning(
                            "taking over session %s from process %s on %s, which is gone", sid, row["pid"], row["host"]
                        )
                    self.db["leases"].upsert(
                        {"session_id": sid, **me, "command": command, "acquired": time.time()}, pk="session_id"
                    )
                    self._leases.add(sid)
                    return Lease(self, sid)
            if time.monotonic() >= deadline:
                raise _busy(ref, row)
            time.sleep(0.2)

    def _lease_pg(self, sid: str, ref: str, me: dict[str, Any], command: str, deadline: float) -> Lease:
        """On PostgreSQL the lease is also a session-level advisory lock on this store's connection: the server
        drops it when the connection ends, so a holder that died anywhere (another machine included) is taken over,
        and one that lives is never. The row says who holds it."""
        while True:
            locked = sid not in self._leases and self.db.execute(
                "select pg_try_advisory_lock(hashtextextended(?, 0))", [LEASE_KEY + sid]
            ).fetchone()[0]
            try:
                with self.transaction():
                    row = next(self.db["leases"].rows_where("session_id = ?", [sid]), None)
                    mine = row is not None and all(row[k] == me[k] for k in ("host", "pid", "pid_start"))
                    if locked or sid in self._leases or mine:  # mine without the lock: another store of this
                        if row is not None and not mine:  # process holds it
                            log.warning("taking over session %s from process %s on %s, whose connection is gone",
                                        sid, row["pid"], row["host"])  # fmt: skip
                        self.db["leases"].upsert(
                            {"session_id": sid, **me, "command": command, "acquired": time.time()}, pk="session_id"
                        )
                        self._leases.add(sid)
                        return Lease(self, sid)
            except BaseException:
                if locked:  # taken, not kept: never left held by this connection
                    self._unlock(sid)
                raise
            if time.monotonic() >= deadline:
                raise _busy(ref, row or {"command": "", "pid": "?", "host": "?", "acquired": time.time()})
            time.sleep(0.2)

    def release(self, sid: str) -> None:
        held = sid in self._leases
        self._leases.discard(sid)
        me = _process()
        try:
            with self.transaction():
                self.db.execute(
                    "delete from leases where session_id = ? and host = ? and pid = ? and pid_start = ?",
                    [sid, me["host"], me["pid"], me["pid_start"]],
                )
        finally:
            if held and not self.sqlite:
                self._unlock(sid)

    def _unlock(self, sid: str) -> None:
        """Give back the session's advisory lock (PostgreSQL), every hold of it this connection has."""
        while self.db.execute("select pg_advisory_unlock(hashtextextended(?, 0))", [LEASE_KEY + sid]).fetchone()[0]:
            pass


def _busy(ref: str, row: dict[str, Any]) -> SessionBusy:
    since = datetime.fromtimestamp(row["acquired"]).strftime("%Y-%m-%d %H:%M:%S")
    return SessionBusy(
        f"session {ref!r} is in use by {row['command'] or 'another deltamem'} (pid {row['pid']} on "
        f"{row['host']}, since {since}); wait for it to finish, stop it, or fork the session"
    )

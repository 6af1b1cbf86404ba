"""Export and import (a part of Store): one session, its snapshots, ledger and conversation, as a portable file that is
itself a deltamem database holding only that session.

Export files are format EXPORT_FORMAT (2: the store's rows, the graph thread up to the latest snapshot and an
`export_info` table); format-1 files (store rows only) still import, with a warning. Written as methods of
`Transfer`, a base class of Store (memory/store.py); the other side of a transfer is a Store of the same class.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from deltamem.memory import checkpoints, pgdb
from deltamem.memory import pieces as pc
from deltamem.memory.errors import StoreError

EXPORT_FORMAT = 2  # 1: store rows only; 2: + the graph thread (the conversation) and an export_info table

log = logging.getLogger("deltamem.memory")


class Transfer:
    """Export and import, as Store methods; the other side of a transfer is a Store of the same class."""

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
            with type(self)(tmp, objects="") as out, self._read():  # self-contained
                _copy_session(self, out, sess["id"], new_id=sess["id"])
                conversation = 0
                if checkpoints.present(self.db):  # the graph thread up to the exported point: the latest snapshot's
                    snaps = [r for r in self.snapshots(sess["id"]) if r["checkpoint_id"]]
                    upto = snaps[-1]["checkpoint_id"] if snaps else None
                    if upto and self.sqlite:
                        checkpoints.create_like(self.db, out.db)
                        with out.transaction():
                            conversation = checkpoints.copy(self.db, out.db, sess["id"], sess["id"], upto=upto)
                    elif upto:  # from PostgreSQL's saver into SQLite's, through the savers (the file is not in place
                        # before it is whole)
                        conversation = checkpoints.convert(self.db, out.db, sess["id"], upto=upto)
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
                src = type(self)(copy, objects="")
            except StoreError as e:
                raise StoreError(f"cannot import {path}: {e}") from e
            with src:
                try:
                    return self._import_from(src, path, fingerprint)
                except (*pgdb.DB_ERRORS, pc.BlobError) as e:
                    if not isinstance(e, sqlite3.Error | pc.BlobError):  # this PostgreSQL database's, not the file's
                        raise StoreError(f"cannot import {path} into {self.path}: {pgdb.redacted(str(e))}") from e
                    raise StoreError(f"{path} is not a valid deltamem export: {e}") from e

    def _import_from(self, src: Transfer, path: Path, fingerprint: str | None) -> str:
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
        conversation = checkpoints.present(src.db)
        if conversation and not self.sqlite:  # PostgreSQL's saver tables, made outside any transaction
            self.conversation_saver().conn.close()
        with self.transaction():
            if next(self.db["sessions"].rows_where("id = ?", [sess["id"]]), None):
                raise StoreError(f"session {sess['id']} already exists here; delete it first to re-import")
            _copy_session(src, self, sess["id"], new_id=sess["id"])
            if conversation:  # the conversation, in the same transaction
                try:
                    if self.sqlite:
                        checkpoints.create_like(src.db, self.db)
                    checkpoints.delete(self.db, sess["id"])  # a deleted session's thread left behind is not this one's
                    if self.sqlite:
                        checkpoints.copy(src.db, self.db, sess["id"], sess["id"])
                    else:  # from SQLite's saver into PostgreSQL's, through the savers
                        checkpoints.convert(src.db, self.db, sess["id"])
                except (ValueError, TypeError, KeyError) as e:
                    raise StoreError(f"{path} is not a valid deltamem export: {e}") from None
        if fmt < 2:
            log.warning(
                "%s was exported by an older deltamem (format %d) without its conversation: the session's next run "
                "starts the model state afresh. Export it again with this version to keep both.",
                path,
                fmt,
            )
        return sess["id"]


def _copy_session(src: Transfer, dst: Transfer, sid: str, new_id: str) -> None:
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
            pieces, tokens = src._piece_rows(snap["id"]), src._piece_rows(snap["id"], "snapshot_tokens")
            if any(data is None for _, data in (*pieces, *tokens)):  # gone from under this read (another
                raise StoreError(  # process's retention dropped it), or lost
                    f"snapshot {snap['id']} of session {sid} lacks some of its stored pieces (it may have been "
                    "dropped while it was read: try again)"
                )
            new_snap = dst._insert_snapshot(pieces, {k: v for k, v in row.items() if k != "id"}, tokens)
            dst.db["session_snapshots"].insert(
                {
                    "session_id": new_id,
                    "snapshot_id": new_snap,
                    "turn_seq": snap["turn_seq"],
                    "name": snap["name"],
                    "checkpoint_id": snap["checkpoint_id"],
                }
            )

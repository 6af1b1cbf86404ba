"""Projects and sessions (a part of Store): find, create, list, rename, move; fork, rewind and delete a session.

A session is found by id, title, or unique id prefix; a reference that matches several is Ambiguous. Turns are
numbered per session from 1 (`seq`); rewinding or forking is possible at turn 0 (the empty state) and at every turn
that has a snapshot. Written as methods of `Sessions`, a base class of Store (memory/store.py): they use its `db`,
`transaction()`, and its snapshots (memory/snapshots.py) and garbage collection (memory/retention.py).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deltamem.memory.errors import Ambiguous, NotFound, StoreError

log = logging.getLogger("deltamem.memory")


def utc_now() -> str:
    """The time a row is written: UTC, ISO 8601 to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Sessions:
    """Projects and sessions, as Store methods (they use its `db`, `transaction()` and `snapshots()`)."""

    def project(self, root: str | Path, name: str | None = None) -> int:
        """The id of the project at `root`, made if it is new."""
        with self.transaction():
            pid = self.project_id(root)
            if pid is not None:
                return pid
            root = str(Path(root).resolve())
            row = {"root": root, "name": name or Path(root).name, "created": utc_now()}
            return self.db["projects"].insert(row).last_pk

    def project_id(self, root: str | Path) -> int | None:
        """The id of the project at `root`, or None (nothing is written)."""
        row = next(self.db["projects"].rows_where("root = ?", [str(Path(root).resolve())]), None)
        return row["id"] if row else None

    def create_session(self, title: str, fingerprint: str, project_id: int | None = None) -> str:
        if not title.strip():
            raise StoreError("a session needs a non-empty title")
        sid = uuid.uuid4().hex[:12]
        now = utc_now()
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
            self.db["sessions"].update(sid, {"project_id": project_id, "updated": utc_now()})
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
            self.db["sessions"].update(sid, {"title": title, "updated": utc_now()})

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

    # --- fork, rewind, delete ---------------------------------------------------------------------------------
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
            self.db["sessions"].update(sid, {"updated": utc_now()})
            self._collect()

    def delete(self, ref: str) -> None:
        with self.transaction():
            sid = self.session(ref)["id"]
            for table in ("session_snapshots", "turns", "ingested", "leases"):
                self.db.execute(f"delete from {table} where session_id = ?", [sid])
            self.db.execute("update sessions set parent_id = null where parent_id = ?", [sid])
            self.db.execute("delete from sessions where id = ?", [sid])
            self._collect()


def _ambiguous(ref: str, rows: list[dict[str, Any]], hint: str) -> Ambiguous:
    """The error for a reference that matches several sessions (rows: sessions with their project's `root`)."""
    found = [{"id": r["id"], "title": r["title"], "project": r["root"]} for r in rows]
    listed = "; ".join(f"{c['id']} {c['title']!r} in {c['project'] or '(no project)'}" for c in found)
    return Ambiguous(f"{ref!r} matches {len(rows)} sessions: {listed}; {hint}", found)


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"

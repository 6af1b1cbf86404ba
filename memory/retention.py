"""Retention and garbage collection (a part of Store): which snapshots a session keeps, trimming a group of sessions to
a size, and deleting what no session uses (snapshots, pieces, graph checkpoints).

A session keeps its last `keep_last` snapshots (its own setting, else the store's) and its named ones; a snapshot row
is deleted once no session references it, a piece once no snapshot uses it. Written as methods of `Retention`, a base
class of Store (memory/store.py).
"""

from __future__ import annotations

from deltamem.memory import checkpoints
from deltamem.memory.objects import ORPHAN_GRACE_S


class Retention:
    """Retention and gc, as Store methods (they use its `db`, `transaction()`, `session()` and `snapshots()`)."""

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
        sql = f"select coalesce(sum(bytes), 0) from pieces where sha256 in ({used % (snaps, snaps)})"
        # int(): PostgreSQL's sum of bigints is a numeric (a Decimal)
        return int(self.db.execute(sql, {"n": len(title_prefix), "prefix": title_prefix}).fetchone()[0])

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
            unused = ("sha256 = :d and not exists (select 1 from snapshot_pieces where sha256 = :d)"
                      " and not exists (select 1 from snapshot_tokens where sha256 = :d)")  # fmt: skip
            for d in digests:
                n_pieces += self._drop_pieces(unused, {"d": d})
        if candidates is None:  # pieces left by an older, interrupted layout: none expected, cheap to check
            n_pieces += self._drop_pieces(f"sha256 not in {used}", {})
        return {"snapshots": len(orphans), "pieces": n_pieces}

    def _drop_pieces(self, where: str, params: dict) -> int:
        """Delete the pieces rows `where` selects; those whose bytes are in the object store are marked 'deleting'
        instead, and go, objects first, once the transaction commits (Store.transaction calls _sweep)."""
        n = self.db.execute(f"delete from pieces where ({where}) and object is null", params).rowcount
        marked = self.db.execute(
            f"update pieces set state = 'deleting' where ({where}) and object is not null and state is null", params
        ).rowcount
        self._doomed = self._doomed or marked > 0
        return n + marked

    def _sweep(self) -> int:
        """Delete the objects of the pieces marked 'deleting', then their rows, unless a writer took one over in
        between (it gave the row a new key). Returns the rows dropped."""
        self._doomed = False
        doomed = self.db.execute("select sha256, object from pieces where state = 'deleting'").fetchall()
        if not doomed or self.objects is None:
            return 0
        self.objects.delete_many(key for _, key in doomed)
        with self.transaction():
            return sum(
                self.db.execute(
                    "delete from pieces where sha256 = ? and object = ? and state = 'deleting'", [d, key]
                ).rowcount
                for d, key in doomed
            )

    def _sweep_orphans(self, grace_s: float) -> int:
        """Delete the objects no pieces row names (uploads whose transaction never committed) older than grace_s."""
        if self.objects is None:
            return 0
        named = {r[0] for r in self.db.execute("select object from pieces where object is not null")}
        old = [key for key, age in self.objects.listing() if age > grace_s]
        return self.objects.delete_many(key for key in old if key not in named)

    def gc(self, orphan_grace_s: float = ORPHAN_GRACE_S) -> dict[str, int]:
        """Delete every snapshot no session references, every piece no snapshot uses and every graph checkpoint no
        kept snapshot points to (a deleted session's included); in an object store, also the objects no row names
        that are older than orphan_grace_s (see memory/objects.py); then give the space back to the file system
        (VACUUM). Returns what was removed and the file's bytes before and after."""
        before = self.file_bytes()
        self._sweep()  # what an earlier sweep left 'deleting' (it failed, or its process died)
        with self.transaction():
            removed = self._collect()
            removed["checkpoints"] = 0
            if checkpoints.present(self.db):
                removed["checkpoints"] = checkpoints.drop_orphans(self.db)
                sids = [r[0] for r in self.db.execute("select id from sessions").fetchall()]
                removed["checkpoints"] += sum(self._prune_thread(sid) for sid in sids)
        removed["objects"] = self._sweep_orphans(orphan_grace_s)
        if self.sqlite:
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:  # what the rows held goes back to PostgreSQL's free space (the file shrinks only with VACUUM FULL)
            for table in ("pieces", "snapshots", "snapshot_pieces", "snapshot_tokens", "session_snapshots"):
                self.db.execute(f"VACUUM {table}")
        return {**removed, "bytes_before": before, "bytes_after": self.file_bytes()}

"""Turns and snapshots (a part of Store): save a turn with its snapshot, list and load snapshots, pin one by name.

A snapshot blob is stored as a prefix (its headers) plus content-addressed pieces (its tensors, memory/pieces.py),
so unchanged attention-window pages are written once however many turns reference them; the token ids a snapshot
has consumed are kept the same way, in chunks of TOKEN_CHUNK. A snapshot is taken at a turn (`turn_seq`, the last
turn it has consumed). Written as methods of `Snapshots`, a base class of Store (memory/store.py).
"""

from __future__ import annotations

import array
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from deltamem.memory import pieces as pc
from deltamem.memory.errors import CorruptSnapshot, NotFound, StoreError
from deltamem.memory.sessions import utc_now

TOKEN_CHUNK = 4096  # token ids per stored chunk: a turn rewrites only the last chunk of a session's ids


class Snapshots:
    """Turns and snapshots, as Store methods (they use its `db`, `transaction()`, `_read()` and `session()`)."""

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
            now = utc_now()
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
            self._record_ingested(sess["id"], seq, ingested)  # the ledger (memory/ledger.py)
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
                tokens = token_chunks(token_ids) if token_ids is not None else []
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
        have: dict[str, str | None] = {}  # digest -> state of its row (None: in use; 'deleting': gc removes it)
        for i in range(0, len(parts), 500):
            batch = [d for d, _ in parts[i : i + 500]]
            marks = ",".join("?" * len(batch))
            have.update(self.db.execute(f"select sha256, state from pieces where sha256 in ({marks})", batch))
        if self.objects is not None:  # upload first (each to a key of its own), then the rows (memory/objects.py)
            need = {d: data for d, data in parts if have.get(d, "") is not None}
            keys = self.objects.put_many(need.items())
            for digest, data in need.items():
                self.db.execute(
                    "insert into pieces (sha256, bytes, data, object, state) values (?, ?, null, ?, null) on conflict"
                    " (sha256) do update set data = null, object = excluded.object, state = null",
                    [digest, len(data), keys[digest]],
                )
                new_bytes += len(data)
        else:
            for digest, data in parts:
                if digest in have:
                    continue
                have[digest] = None
                self._insert_piece(digest, data)
                new_bytes += len(data)
        self.last_save = {"bytes": row["bytes"], "new_bytes": new_bytes}
        snap_id = self.db["snapshots"].insert(row).last_pk
        for table, parts in (("snapshot_pieces", pieces), ("snapshot_tokens", tokens)):
            self.db[table].insert_all({"snapshot_id": snap_id, "idx": i, "sha256": d} for i, (d, _) in enumerate(parts))
        return snap_id

    def _insert_piece(self, digest: str, data: bytes | memoryview) -> None:
        """A piece's row with its bytes. On SQLite, in a transaction (the row and its bytes commit together), they
        go through the blob API: a blob bound as a parameter is copied by SQLite holding the GIL (at 7B shapes some
        0.1 s a state, in which no other thread of `deltamem serve` runs: benchmarks/writer_stalls.py), a blob
        written lets it go."""
        if not self.sqlite or not len(data) or not self.db.conn.in_transaction:
            self.db.execute("insert into pieces (sha256, bytes, data) values (?, ?, ?)", [digest, len(data), data])
            return
        rowid = self.db.execute("insert into pieces (sha256, bytes, data) values (?, ?, zeroblob(?))",
                                [digest, len(data), len(data)]).lastrowid  # fmt: skip
        with self.db.conn.blobopen("pieces", "data", rowid) as blob:
            blob.write(data)

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
            parts = self._piece_rows(snapshot_id, "snapshot_tokens")
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
        parts = self._piece_rows(snapshot_id)
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

    def _piece_rows(self, snapshot_id: int, table: str = "snapshot_pieces") -> list[tuple[str, bytes | None]]:
        """A snapshot's pieces (or token chunks) in order: (sha256, bytes, or None where the piece is missing),
        read from the database or the object store, wherever each one's row says it is."""
        rows = self.db.execute(
            f"""select sp.sha256, cast(p.data as blob), p.object from {table} sp
                left join pieces p on p.sha256 = sp.sha256 where sp.snapshot_id = ? order by sp.idx""",
            [snapshot_id],
        ).fetchall()
        outside = [i for i, (_, data, key) in enumerate(rows) if data is None and key]
        if outside and self.objects is None:
            raise StoreError(f"snapshot {snapshot_id}'s pieces are in an object store this database names none of")
        got = self.objects.get_many([rows[i][2] for i in outside]) if outside else []
        datas = {i: d for i, d in zip(outside, got, strict=True)}
        return [(sha, datas.get(i, data)) for i, (sha, data, _) in enumerate(rows)]

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


def token_chunks(ids: Sequence[int]) -> list[tuple[str, bytes]]:
    """Token ids as int32 little-endian chunks of TOKEN_CHUNK, keyed by sha256."""
    arr = array.array("i", ids)
    if sys.byteorder == "big":
        arr.byteswap()
    data = arr.tobytes()
    step = 4 * TOKEN_CHUNK
    return [(hashlib.sha256(c).hexdigest(), c) for c in (data[i : i + step] for i in range(0, len(data), step))]

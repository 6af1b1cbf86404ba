"""The ingest ledger and recall (a part of Store): which files a session's state has read, and full-text search (FTS5;
PostgreSQL's own on that database) over its turns and the latest text of those files.

The ledger is append-only: a file re-read at a later turn gets a new row, so a rewind restores the ledger that
matches the state (a row with sha256 None: the file was removed). Written as methods of `Ledger`, a base class of
Store (memory/store.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from deltamem.memory.errors import StoreError

# search() on PostgreSQL: its own full-text search over the expression indexes of memory/pgdb.py's schema (English
# stemming, as FTS5's porter tokenizer here), web-search syntax (words, "a phrase", -not, or): no query is malformed
_HEADLINE = "'StartSel=[, StopSel=], MaxFragments=1, MaxWords=12, MinWords=4, FragmentDelimiter=…'"
PG_SEARCH = f"""
    with q as (select websearch_to_tsquery('english', :q) as q)
    select * from (
      select 'turn' as kind, t.seq, t.role as path, t.role,
        ts_headline('english', t.text, q.q, {_HEADLINE}) as snippet,
        -ts_rank(to_tsvector('english', coalesce(t.text, '')), q.q) as rank
      from turns t, q where to_tsvector('english', coalesce(t.text, '')) @@ q.q and t.session_id = :sid
      union all
      select 'file', i.turn_seq, i.path, null, ts_headline('english', i.text, q.q, {_HEADLINE}),
        -ts_rank(to_tsvector('english', coalesce(i.path, '') || ' ' || coalesce(i.text, '')), q.q)
      from ingested i, q
      where to_tsvector('english', coalesce(i.path, '') || ' ' || coalesce(i.text, '')) @@ q.q
        and i.session_id = :sid and i.sha256 is not null
        and i.turn_seq = (select max(turn_seq) from ingested j where j.session_id = i.session_id and j.path = i.path)
    ) hits order by rank, kind desc, seq limit :limit"""


class Ledger:
    """The ingest ledger and recall, as Store methods (they use its `db` and `session()`)."""

    def _record_ingested(self, sid: str, turn_seq: int, files: Iterable[dict[str, Any]]) -> None:
        """Append the ledger entries of files read by the turns up to `turn_seq` (inside the caller's transaction)."""
        for f in files:
            self.db["ingested"].insert(
                {
                    "session_id": sid,
                    "turn_seq": turn_seq,
                    "path": f["path"],
                    "sha256": f.get("sha256"),
                    "mtime": f.get("mtime"),
                    "bytes": f.get("bytes"),
                    "tokens": f.get("tokens"),
                    "text": f.get("text"),
                    "converter": f.get("converter"),
                }
            )

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
        if not self.sqlite:
            return list(self.db.query(PG_SEARCH, {"q": query, "sid": sid, "limit": limit}))
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

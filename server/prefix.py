"""The prefix state cache behind `deltamem serve`: model states keyed by the token ids they consumed, so a request whose
prompt extends an earlier one restores that state and feeds only the rest (what OpenAI-style clients re-send every
turn is never re-read).

States live in host memory under a byte budget (least recently used dropped first) and in the SQLite store, as
snapshots of one deltamem session per name (`X-Deltamem-Session`, default "serve") with their token ids, so a
restarted server hits them again. The engine's own current state counts too: a prompt that extends what it has just
consumed costs no restore at all. A request reuses only its own session's states (the server names sessions per
tenant), so neither a hit nor the time of a miss tells anything of another session's prompts; `share=True` (the
operator's `--share-prefixes`) lets every session reuse the states in memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from deltamem.memory.errors import NotFound
from deltamem.memory.store import Store
from deltamem.model import snapshot as snap
from deltamem.model.engine import Kept

log = logging.getLogger(__name__)
SERVE = "serve:"  # the title prefix of the server's sessions
USER = "user:"  # of those named by OpenAI's `user` field (not by X-Deltamem-Session): their last state may go too


@dataclass
class Hit:
    tokens: int  # prompt tokens the restored (or current) state already holds
    source: str  # "engine", "memory", "store" or "none"


class PrefixCache:
    def __init__(
        self, engine, store: Store | None, byte_budget: int = 512 << 20, keep: int = 256, enabled: bool = True,
        share: bool = False, store_bytes: int | None = None,
    ):  # fmt: skip
        """enabled=False: every prompt is read whole from an empty state (what a GDN hybrid gets from a server
        without prefix states; benchmarks/serve.py's baseline); nothing is kept. share: states in memory serve
        every session (else each session only its own). store_bytes: the stored states' budget in the file (every
        serve session's, least recently used dropped first; the last state of each session a client named with
        X-Deltamem-Session kept: Store.trim)."""
        self.engine, self.store, self.budget, self.keep, self.enabled = engine, store, byte_budget, keep, enabled
        self.share, self.store_bytes = share, store_bytes
        self.used: dict[int, float] = {}  # stored state -> when this server last wrote or restored it
        self.hot: OrderedDict[tuple[str, tuple[int, ...]], Kept] = OrderedDict()  # (scope, ids): copies on the device
        self.hot_bytes = 0
        self.current: tuple[int, ...] = ()  # ids the engine's state has consumed (engine.reset() at start)
        self.scope = ""  # whose request brought the engine to `current`
        self.stored: dict[str, dict[tuple[int, ...], int]] = {}  # session -> ids -> snapshot id
        self.sessions: dict[str, str] = {}  # name -> session id
        # states save() kept, for flush() to store: device copies (their snapshots made then), or made already
        self.pending: list[tuple[str, tuple[int, ...], Kept | snap.Parts]] = []
        self._writer = None  # the engine flush() makes snapshots on (Engine.sibling, made at the first)
        self.pending_bytes = 0  # device memory the pending copies take (within the budget of the hot states)

    # --- lookup -----------------------------------------------------------------------------------------
    def restore_longest(self, ids: list[int], session: str) -> Hit:
        """Bring the engine to the longest known state whose ids are a prefix of `ids` (leaving at least one token to
        feed, which gives the next token's logits); returns how many tokens it holds."""
        limit = len(ids) - 1 if self.enabled else 0
        scope = "" if self.share else session
        best: tuple[int, str, object] = (0, "none", None)
        mine = self.scope == scope
        if mine and 0 < len(self.current) <= limit and tuple(ids[: len(self.current)]) == self.current:
            best = (len(self.current), "engine", None)
        for owner, key in self.hot:
            if owner == scope and best[0] < len(key) <= limit and tuple(ids[: len(key)]) == key:
                best = (len(key), "memory", (owner, key))
        for key, snap_id in self._stored(session).items():
            if best[0] < len(key) <= limit and tuple(ids[: len(key)]) == key:
                best = (len(key), "store", (key, snap_id))
        n, source, ref = best
        self.scope = scope
        if source == "memory":
            self.hot.move_to_end(ref)
            self.engine.restore_kept(self.hot[ref])
            self.current = ref[1]
        elif source == "store":
            key, snap_id = ref
            self.used[snap_id] = time.monotonic()
            try:
                self._restore(self.store.load_snapshot(self.sessions[session], snap_id, joined=False), key)
            except Exception as e:  # pruned or damaged since: fall back to reading the prompt
                log.warning("stored prefix state %s could not be restored (%s); reading the prompt", snap_id, e)
                n, source = 0, "none"
        if source == "none":
            self.engine.reset()
            self.current = ()
        return Hit(n, source)

    def _restore(self, blob, key: tuple[int, ...]) -> None:
        self.engine.restore(blob)
        self.current = key

    # --- saving -----------------------------------------------------------------------------------------
    def consumed(self, ids: list[int]) -> None:
        """The engine has now consumed exactly `ids` (after a feed or a reply)."""
        self.current = tuple(ids)

    def save(self, session: str) -> None:
        """Keep the engine's current state: a copy on its device (Engine.keep; LRU under the byte budget), queued
        for the store too. Only that device-side copy is made here: the snapshot (host copy, hashing, the SQLite
        write) is made from it by flush(), in the thread of a request whose answer is out, while the server's
        scheduler goes on decoding."""
        key, self.scope = self.current, "" if self.share else session  # the engine holds this session's state
        if not self.enabled or not key or (self.scope, key) in self.hot:
            return
        self._keep(session, key, self.engine.keep())

    def save_kept(self, session: str, ids: list[int], kept: Kept) -> None:
        """As save(), for a state kept elsewhere (a reply's from the decode batch), taken over as it is: the engine
        is not involved."""
        key = tuple(ids)
        if self.enabled and key and (("" if self.share else session), key) not in self.hot:
            self._keep(session, key, kept)

    def _keep(self, session: str, key: tuple[int, ...], kept: Kept) -> None:
        if self.store is not None:
            self.pending.append((session, key, kept))
            self.pending_bytes += kept.nbytes
            for i, (name, old_key, old) in enumerate(self.pending[:-1]):  # over the budget (a long prompt, clients
                if self.pending_bytes <= self.budget:  # that left before their flush): the oldest copies become
                    break  # snapshots now, on the host, here
                if isinstance(old, Kept):
                    self.pending[i] = (name, old_key, self._parts(old))
                    self.pending_bytes -= old.nbytes
        self.hot["" if self.share else session, key] = kept
        self.hot_bytes += kept.nbytes
        while self.hot_bytes > self.budget and len(self.hot) > 1:
            _, old = self.hot.popitem(last=False)
            self.hot_bytes -= old.nbytes

    def flush(self) -> None:
        """Write the states save() queued to the store, each in its own transaction (after the reply: a crash
        before loses those states, never half of one)."""
        wrote = bool(self.pending)
        while self.pending:
            session, key, parts = self.pending.pop(0)
            if isinstance(parts, Kept):  # a device copy: its snapshot is made now
                self.pending_bytes -= parts.nbytes
                parts = self._parts(parts)
            sid = self._session(session)
            snap_id = self.store.save_turn(
                sid, [{"role": "event", "text": f"prefix state of {len(key)} tokens"}], parts, token_ids=list(key)
            )
            self._stored(session)[key] = snap_id
            self.used[snap_id] = time.monotonic()
            live = {r["id"] for r in self.store.snapshots(sid)}  # retention may have dropped the oldest
            self.stored[session] = {k: v for k, v in self.stored[session].items() if v in live}
        if wrote and self.store_bytes is not None:
            dropped = set(self.store.trim(SERVE, self.store_bytes, self.used, spare=SERVE + USER))
            for name, index in self.stored.items():
                self.stored[name] = {k: v for k, v in index.items() if v not in dropped}

    def _parts(self, kept: Kept):
        """A kept state's snapshot, as the parts the store keeps: made on an engine of its own (the server's engine
        serves the next request meanwhile), incrementally from the piece cache the copy carries (Engine.snapshot_parts:
        only what changed since is copied to the host and hashed)."""
        if self._writer is None:
            self._writer = self.engine.sibling()
        self._writer.restore_kept(kept)
        parts = self._writer.snapshot_parts()
        kept.pieces = self._writer.piece_cache()  # a later state restored from this copy snapshots incrementally
        return parts

    # --- the store's sessions ---------------------------------------------------------------------------
    def _session(self, name: str) -> str:
        if name not in self.sessions:
            try:
                row = self.store.session(f"{SERVE}{name}", None)
                if row["fingerprint"] != self.engine.fingerprint:
                    raise ValueError(f"session {name!r} belongs to another model; choose another session name")
                self.sessions[name] = row["id"]
            except NotFound:
                self.sessions[name] = self.store.create_session(f"{SERVE}{name}", self.engine.fingerprint)
                self.store.set_keep_last(self.sessions[name], self.keep)
            self.store.lease(self.sessions[name], "deltamem serve")  # this server writes it
        return self.sessions[name]

    def _stored(self, name: str) -> dict[tuple[int, ...], int]:
        if self.store is None:
            return {}
        if name not in self.stored:
            sid = self._session(name)
            index: dict[tuple[int, ...], int] = {}
            for row in self.store.snapshots(sid):
                ids = self.store.load_tokens(sid, row["id"])
                if ids:
                    index[tuple(ids)] = row["id"]
            self.stored[name] = index
        return self.stored[name]

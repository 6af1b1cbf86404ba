"""The prefix state cache behind `deltamem serve`: model states keyed by the token ids they consumed, so a request whose
prompt extends an earlier one restores that state and feeds only the rest (what OpenAI-style clients re-send every
turn is never re-read).

States live on the model's device under a byte budget (least recently used dropped first) and in the store, as snapshots
of one deltamem session per name (`X-Deltamem-Session`, default "serve") with their token ids, so a restarted server
hits them again. A writer thread of the cache's own stores them: it copies a kept state to the host (beside the model,
which goes on; only a CUDA graph capture waits for the copy, through model/cuda_graph.py's CAPTURING), makes its
snapshot and writes it, while requests go on; a request never waits for the store: the states it restores from the store
are read through a connection of their own, which the writer's transactions do not hold up. When states come faster than
the store takes them (a burst of long prompts at 7B shapes: some 0.5 GB each), the oldest not yet written are left
unstored once the copies waiting exceed the byte budget: a cache, not a record (the session's conversation is the
client's), so a state not stored costs at most a prompt read again after a restart (or on another replica). The engine's
own current state counts too: a prompt that extends what it has just consumed costs no restore at all. A request reuses
only its own session's states (the server names sessions per tenant), so neither a hit nor the time of a miss tells
anything of another session's prompts; `share=True` (the operator's `--share-prefixes`) lets every session reuse the
states in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from deltamem.memory.errors import NotFound
from deltamem.memory.store import Store
from deltamem.model.cuda_graph import CAPTURING
from deltamem.model.engine import Kept
from deltamem.server.metrics import Metrics, lap

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
        share: bool = False, store_bytes: int | None = None, metrics=None,
    ):  # fmt: skip
        """enabled=False: every prompt is read whole from an empty state (what a GDN hybrid gets from a server
        without prefix states; benchmarks/serve.py's baseline); nothing is kept. share: states in memory serve
        every session (else each session only its own). store_bytes: the stored states' budget in the file (every
        serve session's, least recently used dropped first; the last state of each session a client named with
        X-Deltamem-Session kept: Store.trim). metrics: what became of the states and where the writer's time went
        (server/metrics.py; default: a registry of its own)."""
        self.metrics = metrics if metrics is not None else Metrics()
        self.engine, self.store, self.budget, self.keep, self.enabled = engine, store, byte_budget, keep, enabled
        self.share, self.store_bytes = share, store_bytes
        self.used: dict[int, float] = {}  # stored state -> when this server last wrote or restored it
        self.hot: OrderedDict[tuple[str, tuple[int, ...]], Kept] = OrderedDict()  # (scope, ids): copies on the device
        self.hot_bytes = 0
        self.current: tuple[int, ...] = ()  # ids the engine's state has consumed (engine.reset() at start)
        self.scope = ""  # whose request brought the engine to `current`
        self.stored: dict[str, dict[tuple[int, ...], int]] = {}  # session -> ids -> snapshot id
        self.sessions: dict[str, str] = {}  # name -> session id, as the writer made or leased it
        # states save() kept, for flush() to store: device copies (their snapshots made then), or made already
        self.pending: list[tuple[str, tuple[int, ...], Kept]] = []
        self.pending_bytes = 0  # device memory the pending copies take (within the budget of the hot states)
        self.unstored = 0  # states left unstored, the store being behind
        # _mu guards the dicts above (held briefly, never while waiting for another lock). The writer alone uses
        # `store` (and leases the sessions it writes); whoever holds the engine restores through `_reader`, a
        # connection of its own to the same database.
        self._mu = threading.Lock()
        self._reader: Store | None = None
        self._ids: dict[str, str] = {}  # session name -> id, as the reader found it
        self._work = threading.Condition(self._mu)  # pending grew, or the writer went idle
        self._writing = False
        self._closed = False
        self._snapshots = None  # the engine the writer makes snapshots on (Engine.sibling)
        self._thread: threading.Thread | None = None
        if store is not None and enabled:
            self._warm()

    def _warm(self) -> None:
        """Make now, at start, what the writer's first state would make while requests run. Its engine, and the
        safetensors header of the state's layout (model/snapcache.py makes it by serialising a whole state, which
        holds the GIL: at 7B shapes 1.4-1.9 s in which no other thread of the server runs, the scheduler's
        included; benchmarks/writer_stalls.py). On a GPU, the pinned host memory of two states' copies (the
        writer's engine holds one while the next is copied), which later copies reuse through torch's caching host
        allocator: a first pinned allocation costs about 2 ms per MB, and meanwhile the driver holds up the model's
        kernel launches (at 7B shapes, a second's pause in the first replies)."""
        with CAPTURING:  # a new engine allocates its state on the device
            self._snapshots = self.engine.sibling()
            if self.engine.device.type == "cuda":  # the writer's engine holds host copies only
                kept = self.engine.keep()
                copies = [kept.to_host() for _ in range(2)]
                self._snapshots.restore_kept(copies[0], copy=False)
                del copies, kept
        self._snapshots.snapshot_parts()  # an empty state has every state's layout (a bounded window's pages)

    # --- lookup -----------------------------------------------------------------------------------------
    def restore_longest(self, ids: list[int], session: str) -> Hit:
        """Bring the engine to the longest known state whose ids are a prefix of `ids` (leaving at least one token to
        feed, which gives the next token's logits); returns how many tokens it holds."""
        limit = len(ids) - 1 if self.enabled else 0
        scope = "" if self.share else session
        stored = self._stored(session)
        with self._mu:
            # the candidates, longest first (the engine's own state, then memory, then the store at equal length):
            # the first whose ids begin the prompt wins, so a conversation's next turn compares one or two
            known = [(len(self.current), 0, "engine", self.current, None)] if self.scope == scope else []
            known += [(len(key), 1, "memory", key, (owner, key)) for owner, key in self.hot if owner == scope]
            known += [(len(key), 2, "store", key, (key, snap_id)) for key, snap_id in stored.items()]
            known.sort(key=lambda c: (-c[0], c[1]))
            n, source, ref = 0, "none", None
            for length, _, where, key, at in known:
                if 0 < length <= limit and tuple(ids[:length]) == key:
                    n, source, ref = length, where, at
                    break
            self.scope = scope
            kept = None
            if source == "memory":
                self.hot.move_to_end(ref)
                kept = self.hot[ref]
            elif source == "store":
                self.used[ref[1]] = time.monotonic()
        if source == "memory":
            self.engine.restore_kept(kept)
            self.current = ref[1]
        elif source == "store":
            key, snap_id = ref
            try:
                self._restore(self._read().load_snapshot(self._ids[session], snap_id, joined=False), key)
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
        for the writer to store. Only that device-side copy is made here, by the caller, who holds the engine."""
        key, self.scope = self.current, "" if self.share else session  # the engine holds this session's state
        if not self.enabled or not key:
            return
        with self._mu:
            if (self.scope, key) in self.hot:
                return
        self._keep(session, key, self.engine.keep())

    def save_kept(self, session: str, ids: list[int], kept: Kept) -> None:
        """As save(), for a state kept elsewhere (a reply's from the decode batch), taken over as it is: the engine
        is not involved."""
        key = tuple(ids)
        if self.enabled and key:
            self._keep(session, key, kept)

    def _keep(self, session: str, key: tuple[int, ...], kept: Kept) -> None:
        scope = "" if self.share else session
        with self._mu:
            if (scope, key) in self.hot:
                return
            if self._closed:  # a reply that ended as the server shut down
                self._unstored()
                return
            self.hot[scope, key] = kept
            self.hot_bytes += kept.nbytes
            while self.hot_bytes > self.budget and len(self.hot) > 1:
                _, old = self.hot.popitem(last=False)
                self.hot_bytes -= old.nbytes
            if self.store is None:
                return
            self.pending.append((session, key, kept))
            self.pending_bytes += kept.nbytes
            while self.pending_bytes > self.budget and len(self.pending) > 1:  # the store is behind: the oldest
                _, old_key, old = self.pending.pop(0)  # copies go unstored (they may still serve from memory)
                self.pending_bytes -= old.nbytes
                self._unstored()
                log.info("a prompt state of %d tokens was not stored: the store is behind (%d so far)", len(old_key),
                         self.unstored)  # fmt: skip
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="deltamem-prefix-writer", daemon=True)
                self._thread.start()
            self._work.notify_all()

    def flush(self) -> None:
        """Wait until every state kept so far is in the store (or failed to be: logged). Never call it holding
        CAPTURING (the writer needs it)."""
        with self._work:
            self._work.wait_for(lambda: not self.pending and not self._writing)

    def close(self) -> None:
        """flush(), then stop the writer (states kept later are not stored) and close the reading connection; the
        store is the caller's to close after this. Never call it holding CAPTURING (the writer needs it)."""
        self.flush()
        with self._work:
            self._closed = True
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _write_loop(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self.pending or self._closed)
                if not self.pending:
                    return
                session, key, kept = self.pending.pop(0)
                self.pending_bytes -= kept.nbytes
                self._writing = True
            try:
                self._write(session, key, kept)
                self.metrics.states.labels("stored").inc()
            except Exception:  # the store failed (disk full, a lease lost, ...): logged, the server goes on
                log.exception("a prompt state of %d tokens could not be stored", len(key))
                self.metrics.states.labels("failed").inc()
            finally:
                with self._work:
                    self._writing = False
                    self._work.notify_all()

    def _write(self, session: str, key: tuple[int, ...], kept: Kept) -> None:
        """Store one kept state, each in its own transaction (a crash loses states not yet written, never half of
        one): copied to the host, its snapshot made from that copy (only what changed since
        its piece cache is hashed), then written. The copy runs beside the model, which goes on decoding: only a CUDA
        graph capture waits for it (and it for one)."""
        t = time.perf_counter()
        with CAPTURING:  # the previous copy, let go here, goes back to the caching host allocator (it records events)
            self._snapshots.restore_kept(kept.to_host(), copy=False)
        t = lap(self.metrics.writer, "copy", t)
        parts = self._snapshots.snapshot_parts()
        kept.pieces = self._snapshots.piece_cache()  # a state restored from this copy later snapshots incrementally
        t = lap(self.metrics.writer, "snapshot", t)
        sid = self._session(session)
        snap_id = self.store.save_turn(
            sid, [{"role": "event", "text": f"prefix state of {len(key)} tokens"}], parts, token_ids=list(key)
        )
        live = {r["id"] for r in self.store.snapshots(sid)}  # retention may have dropped the oldest
        with self._mu:  # (keys deleted in place: a tuple's hash is made anew each time, a long prompt's is slow)
            index = self.stored.setdefault(session, {})
            index[key] = snap_id
            for gone in [k for k, v in index.items() if v not in live]:
                del index[gone]
            self._ids.setdefault(session, sid)
            self.used[snap_id] = time.monotonic()
            used = dict(self.used)
        if self.store_bytes is not None:
            dropped = set(self.store.trim(SERVE, self.store_bytes, used, spare=SERVE + USER))
            with self._mu:
                for index in self.stored.values():
                    for gone in [k for k, v in index.items() if v in dropped]:
                        del index[gone]
        lap(self.metrics.writer, "store", t)

    def _unstored(self) -> None:
        """(Holding _mu.) A state given up unstored."""
        self.unstored += 1
        self.metrics.states.labels("unstored").inc()

    # --- the store's sessions ---------------------------------------------------------------------------
    def _session(self, name: str) -> str:
        if name not in self.sessions:
            row = self._row(self.store, name)
            if row is not None:
                self.sessions[name] = row["id"]
            else:
                self.sessions[name] = self.store.create_session(f"{SERVE}{name}", self.engine.fingerprint)
                self.store.set_keep_last(self.sessions[name], self.keep)
            self.store.lease(self.sessions[name], "deltamem serve")  # this server writes it
        return self.sessions[name]

    def _row(self, store: Store, name: str) -> dict | None:
        """The serve session `name` as `store` has it (None: not made yet); one of another model is refused."""
        try:
            row = store.session(f"{SERVE}{name}", None)
        except NotFound:
            return None
        if row["fingerprint"] != self.engine.fingerprint:
            raise ValueError(f"session {name!r} belongs to another model; choose another session name")
        return row

    def _stored(self, name: str) -> dict[tuple[int, ...], int]:
        """The session's stored states (ids -> snapshot id), read from the store at the session's first request
        (by the engine's holder, through the reading connection)."""
        if self.store is None:
            return {}
        with self._mu:
            if name in self.stored:
                return dict(self.stored[name])
        reader, index = self._read(), {}
        row = self._row(reader, name)  # None: made by the writer at the session's first state
        if row is not None:
            for snap in reader.snapshots(row["id"]):
                ids = reader.load_tokens(row["id"], snap["id"])
                if ids:
                    index[tuple(ids)] = snap["id"]
        with self._mu:
            if row is not None:
                self._ids.setdefault(name, row["id"])
            for key, snap_id in self.stored.get(name, {}).items():  # written meanwhile
                index[key] = snap_id
            self.stored[name] = index
            return dict(index)

    def _read(self) -> Store:
        if self._reader is None:
            self._reader = self.store.another()
        return self._reader

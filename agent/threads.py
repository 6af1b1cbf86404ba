"""Keep the agent's LangGraph threads in step with the store when a session is forked, rewound or deleted.

A snapshot row records the graph checkpoint taken with it. Rewinding a session to a snapshot makes that
checkpoint's state the thread's newest (LangGraph's own time travel: a new checkpoint whose parent is the old
one, so history stays); forking copies it into the new session's thread; deleting drops the thread.
"""

from __future__ import annotations

from pathlib import Path

from agent.graph import build_graph, sqlite_checkpointer
from memory.store import Store
from tools import ToolContext


class _Idle:
    """A brain for a graph that is only read and written, never run."""

    def respond(self, messages, on_piece):
        raise RuntimeError("this graph only edits threads")

    def feed_messages(self, messages, new_count, on_progress):
        raise RuntimeError("this graph only edits threads")


def _has_threads(store: Store) -> bool:
    return "checkpoints" in store.db.table_names()


def _graph(store: Store):
    return build_graph(_Idle(), {}, ToolContext(root=Path(".")), checkpointer=sqlite_checkpointer(store.path))


def _at(thread: str, checkpoint_id: str | None) -> dict:
    conf = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _latest_checkpoint(store: Store, session_id: str) -> str | None:
    snaps = store.snapshots(session_id)
    return snaps[-1]["checkpoint_id"] if snaps else None


def rewind(store: Store, ref: str, to_turn: int) -> None:
    """Store.rewind, and the session's thread back to the checkpoint of the snapshot rewound to."""
    sid = store.session(ref)["id"]
    store.rewind(sid, to_turn)
    if not _has_threads(store):
        return
    graph = _graph(store)
    cid = _latest_checkpoint(store, sid)
    if cid is None:
        graph.checkpointer.delete_thread(sid)
    elif graph.get_state(_at(sid, None)).config["configurable"].get("checkpoint_id") != cid:
        graph.update_state(_at(sid, cid), {"mode": ""}, as_node="feed")


def fork(store: Store, ref: str, at_turn: int | None = None, title: str | None = None) -> str:
    """Store.fork, and the new session's thread started from the checkpoint of the snapshot forked at."""
    src = store.session(ref)["id"]
    new = store.fork(src, at_turn, title)
    cid = _latest_checkpoint(store, new)
    if cid and _has_threads(store):
        graph = _graph(store)
        values = graph.get_state(_at(src, cid)).values
        graph.update_state(_at(new, None), {**values, "mode": ""}, as_node="feed")
    return new


def delete(store: Store, ref: str) -> None:
    sid = store.session(ref)["id"]
    store.delete(sid)
    if _has_threads(store):
        _graph(store).checkpointer.delete_thread(sid)

"""Keep the agent's LangGraph threads in step with the store when a session is forked, rewound or deleted.

A snapshot row records the graph checkpoint taken with it; the committed snapshot is the session, so an agent
opening a session brings the thread to that checkpoint (dropping a run that was killed before it committed).
Rewinding a session to a snapshot makes that checkpoint's state the thread's newest (LangGraph's own time travel:
a new checkpoint whose parent is the old one, so history stays); forking copies the thread (checkpoint ids kept,
so the shared snapshot rows stay valid) and then rewinds the copy; deleting drops the thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from deltamem.agent.graph import build_graph
from deltamem.memory import checkpoints
from deltamem.memory.store import Store
from deltamem.tools import ToolContext


class _Idle:
    """A brain for a graph that is only read and written, never run."""

    def respond(self, messages, on_piece):
        raise RuntimeError("this graph only edits threads")

    def feed_messages(self, messages, new_count, on_progress):
        raise RuntimeError("this graph only edits threads")


def _has_threads(store: Store) -> bool:
    return checkpoints.present(store.db)


@contextlib.contextmanager
def _graph(store: Store) -> Iterator:
    saver = store.conversation_saver()
    try:
        yield build_graph(_Idle(), {}, ToolContext(root=Path(".")), checkpointer=saver)
    finally:
        saver.conn.close()


def _at(thread: str, checkpoint_id: str | None) -> dict:
    conf = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _latest_checkpoint(store: Store, session_id: str) -> str | None:
    snaps = store.snapshots(session_id)
    return snaps[-1]["checkpoint_id"] if snaps else None


def reconcile(graph, thread: str, checkpoint_id: str | None) -> bool:
    """Make the thread's newest state the one at `checkpoint_id` (None: empty), unless it already is: after a
    rewind, or after a run that was killed before it committed. Returns whether anything changed."""
    current = graph.get_state(_at(thread, None))
    if checkpoint_id is None:
        if not current.values:
            return False
        graph.checkpointer.delete_thread(thread)
        return True
    if current.values.get("messages") == graph.get_state(_at(thread, checkpoint_id)).values.get("messages"):
        return False
    graph.update_state(_at(thread, checkpoint_id), {"mode": ""}, as_node="feed")
    return True


def rewind(store: Store, ref: str, to_turn: int) -> None:
    """Store.rewind, and the session's thread back to the checkpoint of the snapshot rewound to."""
    sid = store.session(ref)["id"]
    store.rewind(sid, to_turn)
    if _has_threads(store):
        with _graph(store) as graph:
            reconcile(graph, sid, _latest_checkpoint(store, sid))


def fork(store: Store, ref: str, at_turn: int | None = None, title: str | None = None) -> str:
    """Store.fork, and the new session's thread started from the checkpoint of the snapshot forked at."""
    src = store.session(ref)["id"]
    new = store.fork(src, at_turn, title)
    if _has_threads(store):
        with store.transaction():  # the thread's rows under the new id (neither saver has a copy_thread)
            checkpoints.copy(store.db, store.db, src, new)
        with _graph(store) as graph:
            reconcile(graph, new, _latest_checkpoint(store, new))
    return new


def delete(store: Store, ref: str) -> None:
    sid = store.session(ref)["id"]
    store.delete(sid)
    if _has_threads(store):
        with store.transaction():
            checkpoints.delete(store.db, sid)

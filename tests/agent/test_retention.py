"""Bounded disk: graph checkpoints are pruned in step with snapshot retention (each checkpoint holds the whole
message list, so unpruned they grow with the square of the session), and `sessions gc` reclaims what an unpruned
database holds. A real database file, `run` after `run` on the random-weight model."""

import json
import sqlite3
import time

import pytest

from deltamem.agent.runner import Agent
from deltamem.memory.store import KEEP_LAST, Store
from deltamem.model import load_model
from tests.repos import git_repo
from tests.test_app import deltamem

ROLLBACK = "differs from what the model state consumed"


def size_on_disk(store: Store) -> int:
    for _ in range(200):  # the log's pages into the file: the file is the size (busy while the store's own
        busy, _, _ = store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()  # checkpointer works: again)
        if not busy:
            break
        time.sleep(0.05)
    return store.file_bytes()


def count(store: Store, table: str) -> int:
    return store.db.execute(f"select count(*) from {table}").fetchone()[0]


@pytest.fixture()
def repo(tmp_path):
    return git_repo(tmp_path / "notes", {"README.md": "# Notes\nThe meeting is on Tuesday.\n"})


def test_file_stops_growing_over_200_turns(repo, tmp_path):
    sizes = {}
    with Store(tmp_path / "memory.db") as store:
        agent = Agent(load_model("random", window=64), store, "notes", repo, max_new_tokens=4, retrieve=False)
        for turn in range(1, 201):
            agent.run(f"question {turn}: when is the meeting?")
            assert count(store, "checkpoints") <= KEEP_LAST + 1
            if turn in (50, 100, 200):
                sizes[turn] = size_on_disk(store)
        kept = store.snapshots("notes")
        assert len(kept) == KEEP_LAST and all(s["checkpoint_id"] for s in kept)
        assert count(store, "writes") <= 4 * (KEEP_LAST + 1)
    # the snapshots plateau once the window is full; what still grows is the turn log and the kept checkpoints'
    # message lists, a few KB a turn: under 8 KB a turn over the last 100 (unpruned: about 40% of the file by turn
    # 100). The file grows in whole 64 KiB pages: 8 of them over those 100 turns when this was written.
    assert sizes[200] - sizes[100] < 100 * 8192, sizes
    assert sizes[200] - sizes[100] < 2 * (sizes[100] - sizes[50]) + 50_000, sizes  # no acceleration


def test_gc_reclaims_an_unpruned_database(repo, tmp_path, monkeypatch):
    db = tmp_path / "memory.db"
    with Store(db) as store:  # as a deltamem without pruning wrote it
        monkeypatch.setattr(Store, "_prune_thread", lambda self, sid: 0)
        agent = Agent(load_model("random", window=64), store, "notes", repo, max_new_tokens=4, retrieve=False)
        for turn in range(40):
            agent.run(f"question {turn}")
        monkeypatch.undo()
        unpruned = count(store, "checkpoints")
        kept = [s["turn_seq"] for s in store.snapshots("notes")]
    assert unpruned > 100

    r = deltamem("sessions", "gc", "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    gc = json.loads(r.stdout)
    assert gc["checkpoints"] == unpruned - KEEP_LAST and gc["bytes_after"] < gc["bytes_before"]
    assert sqlite3.connect(db).execute("select count(*) from checkpoints").fetchone()[0] == KEEP_LAST

    # the session resumes without a roll-back, and every kept snapshot can still be rewound to
    r = deltamem("run", "--model", "random", "--window", "64", "--repo", str(repo), "--db", str(db), "--json",
                 "--max-new-tokens", "4", "one more")
    assert r.returncode == 0 and ROLLBACK not in r.stderr, r.stderr
    r = deltamem("sessions", "rewind", "notes", "--to", str(kept[1]), "--yes", "--db", str(db))
    assert r.returncode == 0, r.stderr
    with Store(db) as store:
        agent = Agent(load_model("random", window=64), store, "notes", repo, max_new_tokens=4, retrieve=False)
        assert len(agent.messages()) == kept[1] and agent.session.restored_from == store.snapshots("notes")[-1]["id"]

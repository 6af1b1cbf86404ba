"""The agent on a PostgreSQL memory database (a real server, tests/postgres.py): LangGraph's PostgreSQL saver keeps its
conversation, and what SQLite does (test_export.py, test_retention.py) is the reference. `ingest` and `run`, turn
after turn, answer, feed and reach the same state bit for bit, and the thread holds the same messages; a session
exported from PostgreSQL into a SQLite file, and one from SQLite imported into PostgreSQL, continues as its source
would; rewind, fork, retention and gc keep the thread in step with the snapshots."""

import sqlite3

import pytest

from deltamem.agent import threads
from deltamem.memory.store import Store
from tests.agent.test_export import ROLLBACK, run, sessions
from tests.repos import git_repo
from tests.test_app import deltamem

pytest.importorskip("psycopg")
pytest.importorskip("langgraph.checkpoint.postgres")


def messages(store: Store, ref: str, checkpoint_id: str | None = None) -> list[dict]:
    """The thread's messages at its newest checkpoint (or at `checkpoint_id`), read by the database's own saver."""
    saver = store.conversation_saver()
    try:
        conf = {"thread_id": store.session(ref)["id"], "checkpoint_ns": ""}
        if checkpoint_id:
            conf["checkpoint_id"] = checkpoint_id
        got = saver.get_tuple({"configurable": conf})
        return got.checkpoint["channel_values"].get("messages", []) if got else []
    finally:
        saver.conn.close()


def turn(repo, db, task: str) -> tuple[dict, str]:
    """test_export.run, less the session's and the snapshot's ids (each database numbers its own rows)."""
    out, err = run(repo, db, task)
    out.pop("session"), out.pop("snapshot")
    return out, err


def same_next_turn(repo, lite, twin, db, task: str) -> None:
    """`db`'s next turn is the one the SQLite session `lite` would take (run on `twin`, a copy of it made now)."""
    with sqlite3.connect(lite) as x, sqlite3.connect(twin) as y:
        x.backup(y)
    (here, _), (there, there_err) = turn(repo, twin, task), turn(repo, db, task)
    assert ROLLBACK not in there_err and there == here


def rows(store: Store, table: str, thread: str) -> int:
    return store.db.execute(f"select count(*) from {table} where thread_id = ?", [thread]).fetchone()[0]


def test_the_agent_on_postgres_keeps_its_conversation_as_on_sqlite(tmp_path, pg_url):
    repo = git_repo(tmp_path / "shop", {"README.md": "# Shop\nPrices live in prices.py.\n", "prices.py": "APPLE = 3\n"})
    lite = tmp_path / "lite.db"
    outs = {}
    for db in (lite, pg_url):
        r = deltamem("ingest", "--model", "random", "--repo", str(repo), "--db", str(db))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        outs[db] = [turn(repo, db, "What does an apple cost?")[0], turn(repo, db, "And a pear?")[0]]
    assert outs[pg_url] == outs[lite]  # same answers, tool calls, tokens fed and seen
    with Store(lite) as a, Store(pg_url) as b:
        assert a.load_snapshot("shop") == b.load_snapshot("shop")
        assert len(messages(a, "shop")) >= 4 and messages(b, "shop") == messages(a, "shop")

    # PostgreSQL -> a SQLite file: its next turn is the one the source would have taken (a copy of the SQLite
    # session, its twin, takes it too)
    out = sessions(pg_url, "export", "shop", str(tmp_path / "pg.dmsession"))
    assert out["checkpoints"] > 0
    back, twin = tmp_path / "back.db", tmp_path / "twin.db"
    sessions(back, "import", str(tmp_path / "pg.dmsession"))
    same_next_turn(repo, lite, twin, back, "And a plum?")

    # rewind, fork, retention: the thread follows the snapshots on both databases alike
    with Store(lite) as a, Store(pg_url) as b:
        for s in (a, b):
            threads.rewind(s, "shop", s.snapshots("shop")[-2]["turn_seq"])
        assert messages(b, "shop") == messages(a, "shop") and len(messages(a, "shop")) >= 2
        forks = [threads.fork(s, "shop") for s in (a, b)]
        assert messages(b, forks[1]) == messages(a, forks[0]) == messages(a, "shop")
        sid = b.session("shop")["id"]
        kept = b.snapshots("shop")[-1]["checkpoint_id"]
        before = {t: rows(b, t, sid) for t in ("checkpoints", "checkpoint_blobs", "checkpoint_writes")}
        whole = messages(b, "shop", kept)
        for s in (a, b):
            s.retain("shop", 1)
        after = {t: rows(b, t, sid) for t in before}
        assert after["checkpoints"] < before["checkpoints"] and after["checkpoint_blobs"] < before["checkpoint_blobs"]
        assert after["checkpoints"] == rows(a, "checkpoints", a.session("shop")["id"])
        assert messages(b, "shop", kept) == whole == messages(b, "shop")  # the kept checkpoint loads whole
        threads.delete(b, forks[1])
        b.gc()
        assert all(rows(b, t, forks[1]) == 0 for t in before)

    # SQLite -> PostgreSQL, in place of the session there: the imported one continues as its source
    sessions(lite, "export", "shop", str(tmp_path / "lite.dmsession"))
    with Store(pg_url) as b:
        threads.delete(b, "shop")
    sessions(pg_url, "import", str(tmp_path / "lite.dmsession"))
    same_next_turn(repo, lite, twin, pg_url, "And a fig?")
    with Store(twin) as a, Store(pg_url) as b:
        assert messages(b, "shop") == messages(a, "shop")
        assert b.load_snapshot("shop") == a.load_snapshot("shop")


def test_checkpoint_tables_of_another_program_are_refused(pg_url):
    """A database where another LangGraph program keeps its threads in the saver's tables: deltamem refuses it (its gc
    would take those threads for deleted sessions') with a clear error, and leaves them as they were."""
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row

    from deltamem.memory.errors import StoreError

    with psycopg.connect(pg_url, autocommit=True, row_factory=dict_row) as conn:
        PostgresSaver(conn).setup()
        conn.execute("insert into checkpoints (thread_id, checkpoint_ns, checkpoint_id, checkpoint, metadata) "
                     "values ('theirs', '', '1', '{}', '{}')")  # fmt: skip
    with Store(pg_url) as store:
        with pytest.raises(StoreError, match="did not make"):
            store.conversation_saver()
        assert rows(store, "checkpoints", "theirs") == 1

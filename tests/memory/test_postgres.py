"""The store on a real PostgreSQL server (tests/postgres.py) beyond the shared suite of test_store.py: a session
moves between SQLite and PostgreSQL through export/import and continues exactly; two stores on one database (two
machines) share snapshot pieces in object storage while one saves and the other collects garbage; bad URLs and
foreign databases are refused with a clear error."""

import json
import threading

import pytest
import torch

from deltamem.memory.checkpoints import open_saver
from deltamem.memory.errors import SchemaError, StoreError
from deltamem.memory.store import Store
from deltamem.model import load_model
from tests.memory.test_store import _two_turn_session, ids
from tests.test_app import deltamem

psycopg = pytest.importorskip("psycopg")


@pytest.fixture(autouse=True)
def _no_objects_env(monkeypatch):
    monkeypatch.delenv("DELTAMEM_OBJECTS", raising=False)


def test_a_session_moves_from_sqlite_to_postgres_and_back(tmp_path, ckpt, pg_url):
    with Store(tmp_path / "a.db") as a:
        sid, blobs, fp = _two_turn_session(a, ckpt)
        a.export(sid, tmp_path / "s.dmsession")
        turns, ledger = a.turns(sid), a.ingested(sid)
    open_saver(str(tmp_path / "s.dmsession")).conn.close()  # the file carries LangGraph's (empty) conversation tables
    with Store(pg_url) as pg:
        assert pg.import_(tmp_path / "s.dmsession", fingerprint=fp) == sid
        assert [(t["seq"], t["role"], t["text"]) for t in pg.turns(sid)] == [
            (t["seq"], t["role"], t["text"]) for t in turns
        ]
        assert pg.ingested(sid) == ledger
        assert [s["turn_seq"] for s in pg.snapshots(sid)] == [2, 4]
        assert pg.load_snapshot(sid) == blobs[1]
        fresh, ref = load_model(ckpt, window=64, sink=4), load_model(ckpt, window=64, sink=4)
        fresh.restore(pg.load_snapshot(sid))
        ref.restore(blobs[1])
        assert torch.equal(fresh.feed(ids(7, 70)), ref.feed(ids(7, 70)))
        fresh.restore(pg.load_snapshot(sid))
        pg.save_turn(sid, [{"role": "user", "text": "on postgres"}], fresh.snapshot(), token_ids=ids(9, 1))
        pg.export(sid, tmp_path / "back.dmsession")
        last = pg.load_snapshot(sid)
    with Store(tmp_path / "b.db") as b:  # and back to a SQLite file, with the turn made on PostgreSQL
        assert b.import_(tmp_path / "back.dmsession") == sid
        assert b.load_snapshot(sid) == last and b.turns(sid)[-1]["text"] == "on postgres"
        assert b.load_tokens(sid, b.snapshots(sid)[-1]["id"]) == ids(9, 1)


def test_two_machines_share_pieces_while_one_saves_and_two_collect(tmp_path, ckpt, pg_url):
    """Three stores on one database and one object store, as three machines would have: B's and C's gc, run over and
    over at once while A saves turns, never delete a piece one of A's snapshots still uses (writes are serialized by
    the database's write lock; the objects of dropped pieces go only after the rows' deletion committed)."""
    objects = f"file://{tmp_path / 'objects'}"
    eng = load_model(ckpt, window=64, sink=4)
    with Store(pg_url, objects=objects, keep_last=2) as a, Store(pg_url) as b, Store(pg_url) as c:
        assert b.objects is not None and b.objects.space == a.objects.space  # b found the URL in the database
        sid = a.create_session("shared", eng.fingerprint)
        snaps, errors, stop = [], [], threading.Event()

        def collect(store):
            while not stop.is_set():
                try:
                    store.gc()  # orphan objects younger than the grace (an upload in flight) are kept
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return

        collectors = [threading.Thread(target=collect, args=(s,)) for s in (b, c)]
        for t in collectors:
            t.start()
        try:
            for turn in range(6):
                eng.feed(ids(20, 100 + turn))
                snaps.append(eng.snapshot())
                a.save_turn(sid, [{"role": "user", "text": str(turn)}], snaps[-1])
        finally:
            stop.set()
            for t in collectors:
                t.join()
        assert not errors, errors
        kept = b.snapshots(sid)
        assert [s["turn_seq"] for s in kept] == [5, 6]
        assert [b.load_snapshot(sid, s["id"]) for s in kept] == snaps[-2:]
        assert a.load_snapshot(sid) == snaps[-1]
        b.delete(sid)
        b.gc(orphan_grace_s=0.0)
        assert a.db["pieces"].count == 0 and not list(a.objects.listing())


def test_bad_urls_and_foreign_databases_are_refused(pg_url, postgres):
    with pytest.raises(StoreError, match=r"cannot open the memory database postgresql://postgres@127\.0\.0\.1"):
        Store(pg_url.rsplit("/", 1)[0] + "/no_such_database")
    with pytest.raises(StoreError, match=r"postgresql://bob:\*\*\*@127\.0\.0\.1"):  # the password never shown
        Store(pg_url.replace("postgres@", "bob:hunter2@").rsplit("/", 1)[0] + "/no_such_database")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("create table sessions (id integer)")
    with pytest.raises(SchemaError, match="another program"):
        Store(pg_url)


def test_a_newer_schema_is_refused(pg_url):
    Store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("update deltamem_schema set version = 99")
    with pytest.raises(SchemaError, match="newer than this deltamem"):
        Store(pg_url)


def test_the_sessions_commands_on_postgres(tmp_path, ckpt, pg_url):
    """`deltamem sessions ... --db postgresql://...` as real subprocesses; a database that is not there exits 1 with
    a clear error."""
    with Store(tmp_path / "a.db") as a:
        sid, blobs, _ = _two_turn_session(a, ckpt)
        a.export(sid, tmp_path / "s.dmsession")
    r = deltamem("sessions", "import", str(tmp_path / "s.dmsession"), "--db", pg_url)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = deltamem("sessions", "list", "--json", "--db", pg_url)
    assert r.returncode == 0, r.stderr
    assert [(s["id"], s["turns"], s["snapshots"]) for s in json.loads(r.stdout)] == [(sid, 4, 2)]
    r = deltamem("sessions", "fork", sid, "--at", "2", "--db", pg_url)
    assert r.returncode == 0, r.stderr
    with Store(pg_url) as pg:
        fork = next(s["id"] for s in pg.sessions() if s["id"] != sid)
        assert pg.load_snapshot(fork) == blobs[0] and len(pg.turns(fork)) == 2
    r = deltamem("sessions", "rewind", sid, "--to", "2", "--yes", "--db", pg_url)
    assert r.returncode == 0, r.stderr
    r = deltamem("sessions", "gc", "--db", pg_url)
    assert r.returncode == 0, r.stderr
    with Store(pg_url) as pg:
        assert [s["turn_seq"] for s in pg.snapshots(sid)] == [2] and pg.db["snapshots"].count == 1
    r = deltamem("sessions", "list", "--json", "--db", pg_url.replace("/t_", "/nothere_t_"))
    assert r.returncode == 1 and "cannot open the memory database" in r.stderr and "Traceback" not in r.stderr


def test_sqlite_placeholders_reach_postgres_as_meant(pg_url):
    """The store's SQL is written for SQLite (`?`, `:name`); on PostgreSQL a `?`, `%` or `:x` inside a quoted string
    stays text, a cast (`::`) stays a cast, and each placeholder takes its value: checked by the server itself."""
    with Store(pg_url) as s:
        row = s.db.execute("select '?', 'a%b', ':not', 7::text, ?, ? || 'x'", ["one", "two"]).fetchone()
        assert row == ("?", "a%b", ":not", "7", "one", "twox")
        row = s.db.execute("select :a, :b, 'it''s ?', :a || '%'", {"a": "A", "b": 2}).fetchone()
        assert row == ("A", 2, "it's ?", "A%")

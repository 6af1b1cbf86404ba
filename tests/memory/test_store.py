"""The memory store on real SQLite files, with real engine snapshots of a tiny OLMo Hybrid model."""

import os
import sqlite3

import pytest
import sqlite_utils
import torch

from deltamem.memory.errors import CorruptSnapshot, NotFound, SchemaError, StoreError
from deltamem.memory.migrations import MIGRATIONS
from deltamem.memory.store import Store
from deltamem.model import load_model
from tests.memory.conftest import VOCAB
from tests.objectstore import s3  # noqa: F401  (the SeaweedFS fixture)


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(autouse=True, params=["sqlite", "file", "s3", "postgres"])
def backend(request, tmp_path, monkeypatch):
    """Every test on each place a snapshot's pieces can live (memory/objects.py): inside the database, a folder, and
    an S3 endpoint (SeaweedFS, started by tests/objectstore.py); Store takes it from $DELTAMEM_OBJECTS. And the
    tests of the `store` fixture on PostgreSQL too (tests/postgres.py; pieces inside the database); the others are
    about SQLite files."""
    if request.param == "postgres" and "store" not in request.fixturenames:
        pytest.skip("a test of SQLite files")
    if request.param in ("sqlite", "postgres"):
        monkeypatch.delenv("DELTAMEM_OBJECTS", raising=False)
    elif request.param == "file":
        monkeypatch.setenv("DELTAMEM_OBJECTS", f"file://{tmp_path / 'objects'}")
    else:
        monkeypatch.setenv("DELTAMEM_OBJECTS", request.getfixturevalue("s3").url(f"t-{os.urandom(4).hex()}"))
    return request.param


@pytest.fixture()
def store(tmp_path, backend, request):
    s = Store(request.getfixturevalue("pg_url") if backend == "postgres" else tmp_path / "memory.db")
    yield s
    s.close()


def test_schema_is_exactly_this(store):
    if not store.sqlite:
        cols = store.db.execute("select column_name, data_type from information_schema.columns where table_name = "
                                "'turns' order by ordinal_position").fetchall()  # fmt: skip
        assert cols == [("id", "bigint"), ("session_id", "text"), ("seq", "integer"), ("role", "text"),
                        ("text", "text"), ("tokens", "integer"), ("tool_calls", "text"),
                        ("created", "text")]  # fmt: skip
        assert set(store.db.table_names()) == {
            "projects", "sessions", "turns", "pieces", "snapshots", "snapshot_pieces", "snapshot_tokens",
            "session_snapshots", "ingested", "leases", "settings", "deltamem_schema",
        }  # fmt: skip
        return
    tables = set(store.db.table_names())
    assert {
        "projects",
        "sessions",
        "turns",
        "pieces",
        "snapshots",
        "snapshot_pieces",
        "session_snapshots",
        "ingested",
        "turns_fts",
        "ingested_fts",
    } <= tables
    assert store.db["turns"].columns_dict == {
        "id": int,
        "session_id": str,
        "seq": int,
        "role": str,
        "text": str,
        "tokens": int,
        "tool_calls": str,
        "created": str,
    }
    assert store.db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_newer_or_foreign_database_is_refused(tmp_path):
    Store(tmp_path / "a.db").close()
    con = sqlite3.connect(tmp_path / "a.db")
    con.execute("pragma user_version = 99")
    con.close()
    with pytest.raises(SchemaError, match="newer than this deltamem"):
        Store(tmp_path / "a.db")
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("create table customers (id)")
    con.close()
    with pytest.raises(SchemaError, match="not a deltamem database"):
        Store(tmp_path / "other.db")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "junk.db")


def test_turn_and_snapshot_round_trip_and_continue(store, ckpt):
    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session("work", eng.fingerprint, store.project(ckpt))
    eng.feed(ids(100, 1))
    snap_id = store.save_turn(sid, [{"role": "user", "text": "read the repo", "tokens": 100}], eng.snapshot())
    want = eng.feed(ids(9, 2))

    fresh = load_model(ckpt, window=64, sink=4)
    blob = store.load_snapshot("work")  # by title
    fresh.restore(blob)
    assert torch.equal(fresh.feed(ids(9, 2)), want)
    assert [s["id"] for s in store.snapshots(sid)] == [snap_id]
    assert store.sessions()[0]["turns"] == 1 and store.sessions()[0]["tokens_seen"] == 100


def test_unchanged_window_pages_are_stored_once(store, ckpt):
    eng = load_model(ckpt, window=1024, sink=4)  # 1028 slots = 5 pages of 256 per attention layer
    sid = store.create_session("pages", eng.fingerprint)
    eng.feed(ids(1500, 3), logits="none")
    store.save_turn(sid, [{"role": "user", "text": "a"}], eng.snapshot())
    before = store.db.execute("select coalesce(sum(bytes), 0) from pieces").fetchone()[0]
    eng.feed(ids(200, 4), logits="none")
    blob = eng.snapshot()
    store.save_turn(sid, [{"role": "user", "text": "b"}], blob)
    written = store.db.execute("select sum(bytes) from pieces").fetchone()[0] - before
    kv = eng.state_sizes()["kv"]
    assert written < len(blob) - kv // 2  # most of the window was not rewritten
    assert store.load_snapshot(sid) == blob
    parts = store.load_snapshot(sid, joined=False)  # unjoined: headers, then one part per tensor
    assert b"".join(parts) == blob and len(parts) == 1 + len(eng._state_tensors())
    fresh = load_model(ckpt, window=1024, sink=4)
    fresh.restore(parts)
    assert fresh.snapshot() == blob


def test_corrupt_piece_is_detected_and_nothing_else_touched(store, ckpt):
    eng = load_model(ckpt, window=64, sink=4)
    a = store.create_session("a", eng.fingerprint)
    b = store.create_session("b", eng.fingerprint)
    eng.feed(ids(50, 5))
    blob_a = eng.snapshot()
    store.save_turn(a, [{"role": "user", "text": "x"}], blob_a)
    eng.feed(ids(50, 6))
    store.save_turn(b, [{"role": "user", "text": "y"}], eng.snapshot())
    own, shared = (
        {r["sha256"] for r in store.db["snapshot_pieces"].rows_where("snapshot_id = ?", [store.snapshots(s)[0]["id"]])}
        for s in (b, a)
    )
    victim = sorted(own - shared)[0]
    data = bytearray(piece_bytes(store, victim))
    data[len(data) // 2] ^= 0x40
    set_piece(store, victim, bytes(data))
    for joined in (True, False):
        with pytest.raises(CorruptSnapshot, match="corrupt"):
            store.load_snapshot(b, joined=joined)
    assert store.load_snapshot(a) == blob_a
    set_piece(store, victim, bytes(data[:10]))
    with pytest.raises(CorruptSnapshot):
        store.load_snapshot(b)
    snap_a = store.snapshots(a)[0]["id"]
    prefix = bytearray(store.db["snapshots"].get(snap_a)["prefix"])
    prefix[20] ^= 0x01  # a bit of the snapshot's own JSON header
    store.db["snapshots"].update(snap_a, {"prefix": bytes(prefix)})
    with pytest.raises(CorruptSnapshot, match="headers are corrupt"):
        store.load_snapshot(a)


def piece_bytes(store, digest):
    """A stored piece's bytes, read where they are: the database's row, or the object its row names."""
    import obstore  # the object store backends only

    row = store.db["pieces"].get(digest)
    return row["data"] if row["object"] is None else bytes(obstore.get(store.objects.store, row["object"]).bytes())


def set_piece(store, digest, data):
    import obstore

    row = store.db["pieces"].get(digest)
    if row["object"] is None:
        store.db.execute("update pieces set data = ? where sha256 = ?", [data, digest])
    else:
        obstore.put(store.objects.store, row["object"], data)


def test_wrong_fingerprint_is_refused(store, ckpt, tmp_path):
    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session("s", "another-model")
    eng.feed([1, 2, 3])
    with pytest.raises(StoreError, match="session .* uses another-model"):
        store.save_turn(sid, [{"role": "user", "text": "x"}], eng.snapshot())
    assert store.turns(sid) == []  # nothing written


def test_fork_and_rewind(store, ckpt):
    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session("main", eng.fingerprint)
    blobs = []
    for turn in range(3):
        eng.feed(ids(30, 10 + turn))
        blobs.append(eng.snapshot())
        store.save_turn(sid, [{"role": "user", "text": f"turn {turn}"}], blobs[-1])
    fork = store.fork(sid, at_turn=2)
    assert [t["text"] for t in store.turns(fork)] == ["turn 0", "turn 1"]
    assert store.load_snapshot(fork) == blobs[1]
    a, b = load_model(ckpt, window=64, sink=4), load_model(ckpt, window=64, sink=4)
    a.restore(store.load_snapshot(fork))
    b.restore(blobs[1])
    assert torch.equal(a.feed(ids(5, 20)), b.feed(ids(5, 20)))
    # the fork shares snapshot rows: no new blobs
    assert store.db["snapshots"].count == 3
    # the original is unchanged
    assert len(store.turns(sid)) == 3 and store.load_snapshot(sid) == blobs[2]

    store.rewind(sid, to_turn=1)
    assert [t["text"] for t in store.turns(sid)] == ["turn 0"]
    assert store.load_snapshot(sid) == blobs[0]
    assert store.load_snapshot(fork) == blobs[1]  # the fork still has what it shares
    with pytest.raises(NotFound, match="no snapshot at turn 7"):
        store.rewind(sid, to_turn=7)
    store.rewind(sid, to_turn=0)
    assert store.turns(sid) == [] and store.snapshots(sid) == []
    assert store.load_snapshot(fork) == blobs[1]


def test_retention_and_gc(store, ckpt):
    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session("r", eng.fingerprint)
    for turn in range(4):
        eng.feed(ids(20, 30 + turn))
        store.save_turn(sid, [{"role": "user", "text": str(turn)}], eng.snapshot(), name="first" if turn == 0 else None)
    last = eng.snapshot()
    pieces = store.db["pieces"].count
    store.retain(sid, keep_last=1)
    assert [s["turn_seq"] for s in store.snapshots(sid)] == [1, 4]  # the named one and the last
    assert store.db["snapshots"].count == 2 and store.db["pieces"].count < pieces  # deleted at once
    gc = store.gc()
    assert {k: gc[k] for k in ("snapshots", "pieces", "checkpoints")} == {"snapshots": 0, "pieces": 0, "checkpoints": 0}
    # SQLite's VACUUM gives the space back to the file system; PostgreSQL's keeps it for reuse (its size may grow)
    assert (gc["bytes_after"] <= gc["bytes_before"] or not store.sqlite) and gc["bytes_after"] == store.file_bytes()
    assert store.load_snapshot(sid) == last
    store.delete(sid)
    assert store.sessions() == [] and store.db["pieces"].count == 0
    with pytest.raises(NotFound):
        store.session(sid)


def test_full_text_recall(store):
    sid = store.create_session("notes", "fp")
    store.save_turn(
        sid,
        [
            {"role": "user", "text": "The deploy key lives in vault path secret/ci/deploy"},
            {"role": "assistant", "text": "Noted."},
        ],
    )
    hits = store.search(sid, "vault")
    assert len(hits) == 1 and hits[0]["seq"] == 1 and "[vault]" in hits[0]["snippet"]
    if store.sqlite:  # FTS5's query syntax
        with pytest.raises(StoreError, match="bad search query"):
            store.search(sid, '"unbalanced')
    else:  # PostgreSQL's web-search syntax reads any text: here a phrase found nowhere
        assert store.search(sid, '"unbalanced') == []
        assert [h["seq"] for h in store.search(sid, '"deploy key" -nothing')] == [1]
    assert [h["seq"] for h in store.search(sid, "lived")] == [1]  # stemming: lived ~ lives


def test_retention_applies_on_every_save(tmp_path, ckpt):
    eng = load_model(ckpt, window=64, sink=4)
    with Store(tmp_path / "m.db", keep_last=3) as store:
        sid = store.create_session("r", eng.fingerprint)
        store.set_keep_last(sid, 2)  # the session's own setting wins over the store's
        for turn in range(6):
            eng.feed(ids(10, 40 + turn))
            store.save_turn(
                sid, [{"role": "user", "text": str(turn)}], eng.snapshot(), name="pin" if turn == 1 else None
            )
        assert [s["turn_seq"] for s in store.snapshots(sid)] == [2, 5, 6]
        assert store.db["snapshots"].count == 3
        with pytest.raises(StoreError, match="with the turn"):
            store.save_turn(sid, [], eng.snapshot())


def _older_database(path):
    """A database as the first released schema left it (migration 1 only), with a session in it."""
    from deltamem.memory.migrations import migrate

    db = sqlite_utils.Database(path)
    migrate(db, upto=1)
    db["sessions"].insert({"id": "abc123def456", "title": "old", "fingerprint": "fp", "created": "t", "updated": "t"})
    db["turns"].insert({"session_id": "abc123def456", "seq": 1, "role": "user", "text": "from the old days"})
    db.close()


def test_older_database_is_upgraded_in_place(tmp_path):
    _older_database(tmp_path / "old.db")
    with Store(tmp_path / "old.db") as store:
        assert store.db.execute("pragma user_version").fetchone()[0] == len(MIGRATIONS) > 1
        assert "keep_last" in store.db["sessions"].columns_dict
        assert "checkpoint_id" in store.db["session_snapshots"].columns_dict
        assert [t["text"] for t in store.turns("old")] == ["from the old days"]
        assert store.search("old", "days")[0]["seq"] == 1


def test_ingest_ledger_follows_rewind_and_fork(store, ckpt):
    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session("repo", eng.fingerprint)
    v1 = {
        "path": "src/app.py",
        "sha256": "a" * 64,
        "mtime": 1.0,
        "bytes": 30,
        "tokens": 9,
        "text": "def handler(): return fizzbuzz",
    }
    notes = {
        "path": "NOTES.md",
        "sha256": "b" * 64,
        "mtime": 1.0,
        "bytes": 20,
        "tokens": 5,
        "text": "the invoice was paid in March",
    }
    eng.feed(ids(20, 50))
    store.save_turn(sid, [{"role": "ingest", "text": "2 files"}], eng.snapshot(), ingested=[v1, notes])
    v2 = {**v1, "sha256": "c" * 64, "mtime": 2.0, "text": "def handler(): return quux"}
    gone = {"path": "NOTES.md", "sha256": None}
    eng.feed(ids(20, 51))
    store.save_turn(sid, [{"role": "ingest", "text": "1 changed, 1 removed"}], eng.snapshot(), ingested=[v2, gone])

    assert {p: r["sha256"] for p, r in store.ingested(sid).items()} == {"src/app.py": "c" * 64}
    hits = store.search(sid, "quux OR fizzbuzz OR invoice")
    assert [(h["kind"], h["path"]) for h in hits] == [("file", "src/app.py")] and "[quux]" in hits[0]["snippet"]

    fork = store.fork(sid, at_turn=1)
    assert {p: r["sha256"] for p, r in store.ingested(fork).items()} == {"src/app.py": "a" * 64, "NOTES.md": "b" * 64}
    store.rewind(sid, to_turn=1)
    assert {p: r["sha256"] for p, r in store.ingested(sid).items()} == {"src/app.py": "a" * 64, "NOTES.md": "b" * 64}
    assert {h["path"] for h in store.search(sid, "invoice OR fizzbuzz")} == {"NOTES.md", "src/app.py"}


def _dump(path):
    con = sqlite3.connect(path)
    out = {
        t: con.execute(f"select * from [{t}] order by 1").fetchall()
        for (t,) in con.execute("select name from sqlite_master where type = 'table' and name not like '%fts%'")
    }
    con.close()
    return out


def _two_turn_session(store, ckpt, title="exported"):
    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session(title, eng.fingerprint, store.project(ckpt))
    blobs = []
    for turn in range(2):
        eng.feed(ids(40, 60 + turn))
        blobs.append(eng.snapshot())
        store.save_turn(
            sid,
            [{"role": "user", "text": f"question {turn}"}, {"role": "assistant", "text": "answer"}],
            blobs[-1],
            ingested=[{"path": f"f{turn}.txt", "sha256": str(turn) * 64, "text": "ledger"}],
        )
    return sid, blobs, eng.fingerprint


def test_export_import_round_trip(tmp_path, ckpt):
    with Store(tmp_path / "a.db") as a:
        sid, blobs, fp = _two_turn_session(a, ckpt)
        info = a.export(sid, tmp_path / "s.dmsession")
        assert info["bytes"] > 0 and not list(tmp_path.glob(".s.dmsession*"))
        with pytest.raises(StoreError, match="already exists"):
            a.export(sid, tmp_path / "s.dmsession")
    with Store(tmp_path / "b.db") as b:
        assert b.import_(tmp_path / "s.dmsession", fingerprint=fp) == sid
        assert [t["text"] for t in b.turns(sid)] == ["question 0", "answer", "question 1", "answer"]
        assert [s["turn_seq"] for s in b.snapshots(sid)] == [2, 4]
        assert b.load_snapshot(sid) == blobs[1]
        assert b.load_snapshot(sid, b.snapshots(sid)[0]["id"]) == blobs[0]
        assert set(b.ingested(sid)) == {"f0.txt", "f1.txt"}
        fresh, ref = load_model(ckpt, window=64, sink=4), load_model(ckpt, window=64, sink=4)
        fresh.restore(b.load_snapshot(sid))
        ref.restore(blobs[1])
        assert torch.equal(fresh.feed(ids(7, 70)), ref.feed(ids(7, 70)))
        with pytest.raises(StoreError, match="already exists here"):
            b.import_(tmp_path / "s.dmsession")


def test_bad_imports_are_refused_and_write_nothing(tmp_path, ckpt):
    with Store(tmp_path / "a.db") as a:
        sid, _, fp = _two_turn_session(a, ckpt)
        a.export(sid, tmp_path / "good.db")
    with Store(tmp_path / "target.db") as t:
        _two_turn_session(t, ckpt, title="already here")
    before = _dump(tmp_path / "target.db")

    def tampered(name, sql, *params):
        dst = tmp_path / name
        dst.write_bytes((tmp_path / "good.db").read_bytes())
        con = sqlite3.connect(dst)
        con.execute(sql, params)
        con.commit()
        con.close()
        return dst

    victim = sqlite3.connect(tmp_path / "good.db").execute("select sha256 from pieces limit 1").fetchone()[0]
    cases = {
        tampered(
            "flip.db",
            "update pieces set data = substr(data, 1, 10) || x'00' || substr(data, 12) where sha256 = ?",
            victim,
        ): "corrupt|sha256",
        tampered("cut.db", "update pieces set data = substr(data, 1, 7) where sha256 = ?", victim): "corrupt",
        tampered("fp.db", "update sessions set fingerprint = 'other-model'"): "is of model",
        tampered("newer.db", "pragma user_version = 7"): "newer than this deltamem",
        tmp_path / "good.db": "this model is",  # checked against another model's fingerprint
    }
    (tmp_path / "junk.bin").write_bytes(b"\x00junk" * 999)
    cases[tmp_path / "junk.bin"] = "cannot import"
    cases[tmp_path / "missing.db"] = "no such file"
    with Store(tmp_path / "target.db") as t:
        for path, msg in cases.items():
            with pytest.raises(StoreError, match=msg):
                t.import_(path, fingerprint="someone-else" if path.name == "good.db" else None)
    assert _dump(tmp_path / "target.db") == before
    assert fp != "someone-else"


def test_token_ids_are_kept_with_their_snapshot_in_shared_chunks(store, ckpt):
    from deltamem.memory.store import TOKEN_CHUNK

    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session("ids", eng.fingerprint)
    consumed = []
    sizes = []
    for turn, n in enumerate((TOKEN_CHUNK + 10, 300, 50)):
        new = ids(n, 80 + turn)
        eng.feed(new, logits="none")
        consumed += new
        before = store.db.execute("select sum(bytes) from pieces").fetchone()[0] or 0
        store.save_turn(sid, [{"role": "user", "text": str(turn)}], eng.snapshot(), token_ids=consumed)
        sizes.append(store.db.execute("select sum(bytes) from pieces").fetchone()[0] - before)
    snaps = store.snapshots(sid)
    assert store.load_tokens(sid, snaps[-1]["id"]) == consumed
    assert store.load_tokens(sid, snaps[0]["id"]) == consumed[: TOKEN_CHUNK + 10]
    fork = store.fork(sid, at_turn=2)
    assert store.load_tokens(fork, store.snapshots(fork)[-1]["id"]) == consumed[: TOKEN_CHUNK + 310]
    # the later turns rewrote only the last, partial chunk of ids (plus their state), not the full first chunk
    chunk_rows = store.db.execute("select count(distinct sha256) from snapshot_tokens").fetchone()[0]
    assert chunk_rows == 4  # one full chunk shared by all three, and each snapshot's own tail
    store.rewind(sid, to_turn=1)
    store.delete(fork)
    assert store.db.execute("select count(distinct sha256) from snapshot_tokens").fetchone()[0] == 2
    left = {r[0] for r in store.db.execute("select sha256 from pieces")}
    used = {
        r[0] for r in store.db.execute("select sha256 from snapshot_pieces union select sha256 from snapshot_tokens")
    }
    assert left == used  # nothing orphaned, nothing missing


def test_large_pages_and_the_log_copied_in_the_background(ckpt, tmp_path):
    """A new database has 64 KiB pages; a save does not copy the write-ahead log into the database itself (the
    checkpoint runs from another connection once the log is large), and closing leaves everything in the file."""
    from deltamem.memory import store as store_module

    path = tmp_path / "memory.db"
    with Store(path) as s:
        assert s.db.execute("pragma page_size").fetchone()[0] == 65536
        eng = load_model(ckpt, window=None)  # an unbounded window: the state grows with every token
        sid = s.create_session("big", eng.fingerprint)
        eng.feed(ids(3000, 1), logits="none")
        first = eng.snapshot_parts()
        s.save_turn(sid, [{"role": "user", "text": "x"}], first)
        assert s._checkpointer is None  # a log under WAL_CHECKPOINT_BYTES: nothing copied, not even by the commit
        assert path.stat().st_size < first.nbytes < (tmp_path / "memory.db-wal").stat().st_size
        eng.feed(ids(500, 2), logits="none")
        second = eng.snapshot_parts()
        store_module.WAL_CHECKPOINT_BYTES = 1 << 16  # small, so that this save starts the background checkpoint
        try:
            s.save_turn(sid, [{"role": "user", "text": "y"}], second)
        finally:
            store_module.WAL_CHECKPOINT_BYTES = 64 << 20
        s._checkpointer.join()
        assert path.stat().st_size > first.nbytes  # the thread copied the log into the database file
    with Store(path) as s:
        assert s.load_snapshot("big") == bytes(second)

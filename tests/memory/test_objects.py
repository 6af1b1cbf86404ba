"""Snapshot pieces in an object store (memory/objects.py): a local folder and SeaweedFS's S3 gateway, each started
here. Checked against the files and objects themselves: where the bytes are, that a killed writer's upload shows no
turn and is collected only after the grace, that gc racing a writer which takes a piece over deletes nothing in
use, that gc in two processes beside a writer loses nothing, and that a session moves between backends intact."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltamem.memory.errors import StoreError
from deltamem.memory.store import Store
from deltamem.model import load_model
from tests.memory.conftest import VOCAB
from tests.objectstore import s3  # noqa: F401  (the SeaweedFS fixture)

ROOT = Path(__file__).resolve().parents[2]


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(params=["file", "s3"])
def objects(request, tmp_path):
    """An object store URL of each kind, empty."""
    if request.param == "file":
        return f"file://{tmp_path / 'objects'}"
    return request.getfixturevalue("s3").url(f"t-{os.urandom(4).hex()}")


def stored_keys(store):
    return sorted(key for key, _ in store.objects.listing())


def session_with_turns(store, ckpt, title="work", turns=3, seed=0):
    eng = load_model(ckpt, window=64, sink=4)
    sid = store.create_session(title, eng.fingerprint, store.project(ckpt))
    blobs = []
    for t in range(turns):
        eng.feed(ids(30, seed + t))
        blobs.append(eng.snapshot())
        store.save_turn(sid, [{"role": "user", "text": f"turn {t}"}], blobs[-1], token_ids=ids(30, seed + t))
    return sid, blobs, eng


def test_pieces_live_in_the_object_store_and_the_database_records_where(tmp_path, ckpt, objects):
    db = tmp_path / "memory.db"
    with Store(db, objects=objects) as store:
        sid, blobs, _ = session_with_turns(store, ckpt)
        rows = list(store.db.execute("select sha256, data, object from pieces"))
        space = store.db.execute("select value from settings where key = 'objects_space'").fetchone()[0]
        assert rows and all(data is None and key.startswith(f"pieces/{space}/{sha[:2]}/{sha}-")
                            for sha, data, key in rows)  # fmt: skip
        assert stored_keys(store) == sorted(key for _, _, key in rows)  # each piece once, nothing else
        assert store.last_save["new_bytes"] > 0
    with Store(db) as store:  # the database says where its pieces are
        assert store.objects.url == objects
        assert store.load_snapshot(sid) == blobs[-1]
        assert [store.load_snapshot(sid, s["id"]) for s in store.snapshots(sid)] == blobs
    for other in ("", f"file://{tmp_path / 'elsewhere'}"):
        with pytest.raises(StoreError, match="keeps its snapshot pieces in"):
            Store(db, objects=other)


def test_bad_object_urls_are_clear_errors(tmp_path):
    for url, msg in [("ftp://host/x", "takes file:///FOLDER or s3://"), ("s3://", "an S3 URL is"),
                     ("file://host/x", "a file URL is")]:  # fmt: skip
        with pytest.raises(StoreError, match=msg):
            Store(tmp_path / f"{len(msg)}.db", objects=url)


def test_gc_racing_a_writer_that_takes_a_piece_over_deletes_nothing_in_use(tmp_path, ckpt, monkeypatch):
    """gc marks a piece 'deleting'; before it sweeps, a writer needs that piece again and uploads it afresh; the
    sweep then leaves the row (and its new object) alone, and the old object goes with gc's orphans."""
    url = f"file://{tmp_path / 'objects'}"
    with Store(tmp_path / "m.db", objects=url) as gc_side, Store(tmp_path / "m.db", objects=url) as writer:
        eng = load_model(ckpt, window=64, sink=4)
        a = gc_side.create_session("a", eng.fingerprint)
        eng.feed(ids(40, 1))
        blob = eng.snapshot()
        gc_side.save_turn(a, [{"role": "user", "text": "x"}], blob)
        old = dict(gc_side.db.execute("select sha256, object from pieces"))
        sweep = gc_side._sweep
        monkeypatch.setattr(gc_side, "_sweep", lambda: 0)  # gc stops between its mark and its sweep
        gc_side.delete(a)
        assert {s for (s,) in gc_side.db.execute("select state from pieces")} == {"deleting"}
        b = writer.create_session("b", eng.fingerprint)
        writer.save_turn(b, [{"role": "user", "text": "y"}], blob)  # the same pieces, needed again
        new = dict(writer.db.execute("select sha256, object from pieces where state is null"))
        assert new.keys() == old.keys() and not set(new.values()) & set(old.values())
        assert sweep() == 0  # the sweep runs on: no row is 'deleting' any more, none goes
        assert writer.load_snapshot(b) == blob
        assert set(stored_keys(writer)) == set(new.values()) | set(old.values())  # the old objects: named by none
        assert writer.gc(orphan_grace_s=0)["objects"] == len(old)  # so gc takes them once they are old enough
        assert stored_keys(writer) == sorted(new.values()) and writer.load_snapshot(b) == blob


KILLED_WRITER = """
import os, signal, sys
from deltamem.memory.store import Store
store = Store(sys.argv[1])
blob = open(sys.argv[2], "rb").read()
with store.transaction():
    store.save_turn(sys.argv[3], [{"role": "user", "text": "never committed"}], blob)
    os.kill(os.getpid(), signal.SIGKILL)  # after the upload and the rows, before the commit
"""


def test_a_writer_killed_before_its_commit_shows_no_turn_and_its_upload_goes_after_the_grace(tmp_path, ckpt, objects):
    db = tmp_path / "m.db"
    with Store(db, objects=objects) as store:
        sid, blobs, eng = session_with_turns(store, ckpt, turns=2)
        keys = stored_keys(store)
    eng.feed(ids(50, 99))
    (tmp_path / "next.snap").write_bytes(eng.snapshot())
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(db), str(tmp_path / "next.snap"), sid],
                       env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr
    with Store(db) as store:
        assert [t["text"] for t in store.turns(sid)] == ["turn 0", "turn 1"]
        orphans = set(stored_keys(store)) - set(keys)
        assert orphans  # uploaded, named by no row
        assert store.gc()["objects"] == 0 and set(stored_keys(store)) - set(keys) == orphans  # within the grace
        assert store.gc(orphan_grace_s=0)["objects"] == len(orphans)
        assert stored_keys(store) == keys
        assert store.load_snapshot(sid) == blobs[-1]


GC_LOOP = """
import sys, time
from deltamem.memory.store import Store
end = time.time() + float(sys.argv[2])
with Store(sys.argv[1]) as store:
    while time.time() < end:
        store.gc(orphan_grace_s=5)
"""
WRITER = """
import sys
import torch
from deltamem.memory.store import Store
from deltamem.model import load_model
eng = load_model(sys.argv[2], window=64, sink=4)
g = torch.Generator().manual_seed(3)
with Store(sys.argv[1], keep_last=2) as store:
    for t in range(int(sys.argv[4])):
        eng.feed(torch.randint(0, 320, (20,), generator=g).tolist())
        store.save_turn(sys.argv[3], [{"role": "user", "text": str(t)}], eng.snapshot())
    print(eng.snapshot().hex())
"""


def test_two_gc_processes_beside_a_writer_delete_nothing_in_use(tmp_path, ckpt, objects):
    db = tmp_path / "m.db"
    with Store(db, objects=objects) as store:
        sid, _, _ = session_with_turns(store, ckpt, turns=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    gcs = [subprocess.Popen([sys.executable, "-c", GC_LOOP, str(db), "20"], env=env) for _ in range(2)]
    w = subprocess.run([sys.executable, "-c", WRITER, str(db), str(ckpt), sid, "12"], env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    for p in gcs:
        assert p.wait(timeout=120) == 0
    assert w.returncode == 0, w.stderr
    with Store(db) as store:
        assert store.load_snapshot(sid) == bytes.fromhex(w.stdout.strip())
        for s in store.snapshots(sid):  # every kept snapshot whole
            store.load_snapshot(sid, s["id"])
        named = {k for (k,) in store.db.execute("select object from pieces")}
        assert named <= set(stored_keys(store))


def test_a_session_moves_between_backends_and_continues_exactly(tmp_path, ckpt, objects):
    with Store(tmp_path / "inline.db", objects="") as a:
        sid, blobs, eng = session_with_turns(a, ckpt)
        a.export(sid, tmp_path / "one.dmsession")
    with Store(tmp_path / "remote.db", objects=objects) as b:
        assert b.import_(tmp_path / "one.dmsession") == sid
        assert b.load_snapshot(sid) == blobs[-1] and stored_keys(b)
        b.export(sid, tmp_path / "two.dmsession")  # self-contained again
    with Store(tmp_path / "local.db", objects=f"file://{tmp_path / 'local-objects'}") as c:
        c.import_(tmp_path / "two.dmsession")
        fresh = load_model(ckpt, window=64, sink=4)
        fresh.restore(c.load_snapshot(sid, joined=False))
        follow = ids(6, 123)
        assert torch.equal(fresh.feed(follow), eng.feed(follow))  # the same next-token logits as where it began
        assert c.load_tokens(sid, c.snapshots(sid)[-1]["id"]) == ids(30, 2)


def test_a_piece_missing_from_the_object_store_is_a_clear_error(tmp_path, ckpt):
    with Store(tmp_path / "m.db", objects=f"file://{tmp_path / 'o'}") as store:
        sid, blobs, _ = session_with_turns(store, ckpt, turns=1)
        key = store.db.execute("select object from pieces order by bytes desc").fetchone()[0]
        (tmp_path / "o" / key).unlink()
        with pytest.raises(Exception, match="lacks 1 of its stored pieces"):
            store.load_snapshot(sid)



def test_cli_moves_a_session_into_object_storage_and_says_what_is_wrong(tmp_path, ckpt, objects):
    from tests.test_app import deltamem

    with Store(tmp_path / "inline.db", objects="") as a:
        sid, blobs, _ = session_with_turns(a, ckpt)
    r = deltamem("sessions", "export", sid, str(tmp_path / "s.dmsession"), "--db", str(tmp_path / "inline.db"))
    assert r.returncode == 0, r.stderr
    remote = str(tmp_path / "remote.db")
    r = deltamem("sessions", "import", str(tmp_path / "s.dmsession"), "--db", remote, "--objects", objects)
    assert r.returncode == 0, r.stderr
    r = deltamem("sessions", "list", "--json", "--db", remote)  # the database remembers where its pieces are
    assert r.returncode == 0 and json.loads(r.stdout)[0]["id"] == sid, r.stderr
    with Store(remote) as b:
        assert b.objects.url == objects and b.load_snapshot(sid) == blobs[-1]
    r = deltamem("sessions", "gc", "--json", "--db", remote)
    assert r.returncode == 0 and json.loads(r.stdout)["objects"] == 0, r.stdout + r.stderr
    r = deltamem("sessions", "list", "--db", remote, "--objects", f"file://{tmp_path / 'other'}")
    assert r.returncode != 0 and "keeps its snapshot pieces in" in r.stderr and "Traceback" not in r.stderr
    r = deltamem("sessions", "list", "--db", str(tmp_path / "new.db"), "--objects", "ftp://x/y")
    assert r.returncode != 0 and "takes file:///FOLDER or s3://" in r.stderr and "Traceback" not in r.stderr


def test_an_object_store_that_fails_its_deletes_costs_no_turn_and_gc_finishes_later(tmp_path, ckpt, monkeypatch):
    with Store(tmp_path / "m.db", objects=f"file://{tmp_path / 'o'}", keep_last=1) as store:
        real = store.objects.delete_many

        def unreachable(keys):
            raise StoreError("the object store is unreachable (injected)")

        monkeypatch.setattr(store.objects, "delete_many", unreachable)
        sid, blobs, _ = session_with_turns(store, ckpt, turns=3)  # retention drops the older two: their deletes fail
        assert [t["text"] for t in store.turns(sid)] == ["turn 0", "turn 1", "turn 2"]
        assert store.load_snapshot(sid) == blobs[-1]
        left = store.db.execute("select count(*) from pieces where state = 'deleting'").fetchone()[0]
        assert left > 0
        monkeypatch.setattr(store.objects, "delete_many", real)
        store.gc()
        assert store.db.execute("select count(*) from pieces where state = 'deleting'").fetchone()[0] == 0
        assert stored_keys(store) == sorted(k for (k,) in store.db.execute("select object from pieces"))
        assert store.load_snapshot(sid) == blobs[-1]


def test_two_databases_sharing_a_bucket_never_collect_each_others_pieces(tmp_path, ckpt, objects):
    with Store(tmp_path / "a.db", objects=objects) as a, Store(tmp_path / "b.db", objects=objects + "/") as b:
        sa, blobs_a, _ = session_with_turns(a, ckpt, title="a")
        sb, blobs_b, _ = session_with_turns(b, ckpt, title="b", seed=50)
        assert b.objects.url == objects  # one store, however the URL ends
        a.delete(sa)
        assert a.gc(orphan_grace_s=0)["objects"] == 0  # b's pieces are no orphans of a's
        assert b.gc(orphan_grace_s=0)["objects"] == 0
        assert b.load_snapshot(sb) == blobs_b[-1] and stored_keys(a) == []

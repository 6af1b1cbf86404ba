"""`deltamem sessions ...` as real subprocesses on a real database file, checked against the file itself (read
with plain sqlite3) and against the engine: list, show, pin, fork, rewind, export, import, delete, gc, bad input."""

import json
import sqlite3

import pytest
import torch

from deltamem.memory.store import Store
from deltamem.model import load_model
from tests.memory.conftest import VOCAB
from tests.test_app import deltamem


@pytest.fixture()
def db(tmp_path, ckpt):
    """A database with one session of three turns, each with its snapshot; returns (path, session id, blobs)."""
    path = tmp_path / "memory.db"
    eng = load_model(ckpt, window=64, sink=4)
    blobs = []
    with Store(path) as store:
        sid = store.create_session("bugfix", eng.fingerprint, store.project(ckpt))
        for turn in range(3):
            eng.feed(torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(turn)))
            blobs.append(eng.snapshot())
            store.save_turn(sid, [{"role": "user", "text": f"turn {turn} text", "tokens": 30}], blobs[-1])
    return path, sid, blobs


def sessions(db_path, *args):
    r = deltamem("sessions", *args, "--db", str(db_path))
    assert "Traceback" not in r.stderr, r.stderr
    return r


def rows(db_path, sql, *params):
    con = sqlite3.connect(db_path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_list_and_show(db):
    path, sid, _ = db
    r = sessions(path, "list", "--json")
    assert r.returncode == 0, r.stderr
    (listed,) = json.loads(r.stdout)
    assert (listed["id"], listed["title"], listed["turns"], listed["tokens_seen"]) == (sid, "bugfix", 3, 90)
    assert listed["snapshot_bytes"] == rows(path, "select bytes from snapshots order by id desc limit 1")[0][0]
    text = sessions(path, "list").stdout
    assert sid in text and "bugfix" in text
    shown = json.loads(sessions(path, "show", "bugfix", "--json").stdout)
    assert [t["text"] for t in shown["turns"]] == ["turn 0 text", "turn 1 text", "turn 2 text"]
    assert [s["turn_seq"] for s in shown["snapshots"]] == [1, 2, 3]
    assert "turn 2 text" in sessions(path, "show", sid[:6]).stdout


def test_fork_rewind_export_import_delete_gc(db, tmp_path, ckpt):
    path, sid, blobs = db
    r = sessions(path, "fork", sid, "--at", "2", "--json")
    assert r.returncode == 0, r.stderr
    fork = json.loads(r.stdout)["session"]
    assert rows(path, "select text from turns where session_id = ? order by seq", fork) == [
        ("turn 0 text",),
        ("turn 1 text",),
    ]
    assert rows(path, "select count(*) from snapshots")[0][0] == 3  # shared, not copied
    with Store(path) as store:
        a, b = load_model(ckpt, window=64, sink=4), load_model(ckpt, window=64, sink=4)
        a.restore(store.load_snapshot(fork))
        b.restore(blobs[1])
        follow = list(range(5))
        assert torch.equal(a.feed(follow), b.feed(follow))

    assert sessions(path, "rewind", sid, "--to", "1", "--yes").returncode == 0
    assert rows(path, "select seq from turns where session_id = ?", sid) == [(1,)]
    assert rows(path, "select count(*) from turns where session_id = ?", fork)[0][0] == 2  # the fork is untouched

    out = tmp_path / "bugfix.dmsession"
    assert sessions(path, "export", fork, str(out)).returncode == 0
    other = tmp_path / "elsewhere.db"
    r = sessions(other, "import", str(out), "--model", str(ckpt), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["session"] == fork
    with Store(other) as store:
        assert store.load_snapshot(fork) == blobs[1]

    assert sessions(path, "delete", fork, "--yes").returncode == 0
    assert rows(path, "select count(*) from sessions where id = ?", fork)[0][0] == 0
    r = sessions(path, "gc", "--json")
    gc = json.loads(r.stdout)
    assert r.returncode == 0 and (gc["snapshots"], gc["pieces"]) == (0, 0)  # delete already collected
    assert gc["bytes_after"] == path.stat().st_size <= gc["bytes_before"]  # vacuumed, the log truncated
    assert rows(path, "select count(*) from snapshots")[0][0] == 1  # only the rewound session's turn-1 snapshot
    assert rows(path, "pragma integrity_check")[0][0] == "ok"


def test_a_pinned_snapshot_outlives_retention_until_unpinned(db, ckpt):
    path, sid, blobs = db
    r = sessions(path, "pin", sid, "baseline", "--at", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["turn"] == 1
    assert rows(path, "select turn_seq from session_snapshots where name = 'baseline'") == [(1,)]
    with Store(path) as store:
        store.retain(sid, 1)  # as a session with keep_last 1 does after a turn
    assert rows(path, "select turn_seq from session_snapshots where session_id = ?", sid) == [(1,), (3,)]
    shown = json.loads(sessions(path, "show", sid, "--json").stdout)
    assert [(s["turn_seq"], s["name"]) for s in shown["snapshots"]] == [(1, "baseline"), (3, None)]
    r = sessions(path, "fork", sid, "--at", "1", "--json")
    with Store(path) as store:
        assert store.load_snapshot(json.loads(r.stdout)["session"]) == blobs[0]
    assert sessions(path, "pin", sid, "baseline", "--unpin").returncode == 0  # by its name
    with Store(path) as store:
        store.retain(sid, 1)
    assert rows(path, "select turn_seq from session_snapshots where session_id = ?", sid) == [(3,)]
    for args, message in ((["x", "--at", "2"], "no snapshot at turn 2 (snapshots at turns: 3)"),
                          (["x", "--unpin"], "no snapshot named 'x' (snapshots at turns: 3)"),
                          ([], "give a NAME to pin the snapshot by"),
                          (["--unpin"], "--unpin needs the snapshot's NAME or --at TURN")):
        r = sessions(path, "pin", sid, *args)
        assert r.returncode == 1 and message in r.stderr, r.stderr
    other = json.loads(sessions(path, "fork", sid, "--at", "0", "--json").stdout)["session"]  # a session at turn 0
    r = sessions(path, "pin", other, "x")
    assert r.returncode == 1 and "has no snapshot yet (snapshots at turns: none yet)" in r.stderr, r.stderr


def test_bad_input_gets_a_message_and_nonzero_exit(db, tmp_path):
    path, sid, _ = db
    before = rows(path, "select id, seq from turns order by id")
    (tmp_path / "junk.dmsession").write_bytes(b"not a database at all" * 50)
    cases = [
        (("show", "nope"), 1, "no session 'nope'"),
        (("fork", sid, "--at", "9"), 1, "no snapshot at turn 9"),
        (("rewind", sid, "--to", "7", "--yes"), 1, "no snapshot at turn 7"),
        (("rewind", sid, "--to", "1"), 1, "pass --yes"),  # stdin is not a terminal: never deletes unasked
        (("delete", sid), 1, "pass --yes"),
        (("export", sid, str(tmp_path / "no" / "dir" / "x.db")), 1, "is not a directory"),
        (("import", str(tmp_path / "junk.dmsession")), 1, "cannot import"),
        (("import", str(tmp_path / "missing.dmsession")), 1, "no such file"),
        (("import", str(tmp_path / "junk.dmsession"), "--model", "no/such/model"), 1, "no model at"),
        (("rewind", sid), 2, "--to"),
        (("frobnicate",), 2, "invalid choice"),
    ]
    for args, code, message in cases:
        r = sessions(path, *args)
        assert r.returncode == code and message in r.stderr, (args, r.returncode, r.stderr)
    assert rows(path, "select id, seq from turns order by id") == before  # nothing touched

    r = deltamem("sessions", "list", "--db", "/proc/no/such.db")
    assert r.returncode == 1 and "cannot open the memory database" in r.stderr and "Traceback" not in r.stderr


def test_import_refuses_another_models_session(db, tmp_path):
    path, sid, _ = db
    out = tmp_path / "s.dmsession"
    assert sessions(path, "export", sid, str(out)).returncode == 0
    r = sessions(tmp_path / "other.db", "import", str(out), "--model", "random")
    assert r.returncode == 1 and "was saved with model" in r.stderr
    assert rows(tmp_path / "other.db", "select count(*) from sessions")[0][0] == 0

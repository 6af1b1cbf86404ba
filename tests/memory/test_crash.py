"""Nothing lost: a writer killed with SIGKILL at random moments, 200 times, never costs a committed turn, never
corrupts the database, and the last committed snapshot restores and continues exactly like the reference run.
Also: a reader beside a writer never sees "database is locked"."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deltamem.memory.store import KEEP_LAST, Store
from deltamem.model import load_model
from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid

ROOT = Path(__file__).resolve().parents[2]
TURNS = 40
KILLS = 200


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference run: the snapshot after each 16-token turn, and the logits that follow each one."""
    d = tmp_path_factory.mktemp("olmo")
    make_olmo_hybrid(d, vocab=320, **OLMO_SHAPES["olmo_gqa_rope"])
    blobs = tmp_path_factory.mktemp("blobs")
    eng = load_model(d, window=32, sink=4)
    gen = torch.Generator().manual_seed(0)
    follow = torch.randint(0, 320, (5,), generator=gen)
    after = {}
    probe = load_model(d, window=32, sink=4)  # one engine, each snapshot restored into it in turn
    for i in range(1, TURNS + 1):
        eng.feed(torch.randint(0, 320, (16,), generator=gen))
        blob = eng.snapshot()
        (blobs / f"{i}.snap").write_bytes(blob)
        probe.restore(blob)
        after[i] = probe.feed(follow)
    return d, blobs, eng.fingerprint, follow, after


def spawn(db, blobs, n, title="crash"):
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("writer.py")), str(db), str(blobs), str(n), title],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def committed(log: Path) -> int:
    """The highest turn the writer reported committed (a line cut by the kill does not count)."""
    if not log.exists():
        return 0
    lines = log.read_text().split("\n")[:-1]  # the last element is "" or a partial line
    return int(lines[-1]) if lines else 0


def test_sigkill_never_loses_a_committed_turn(tmp_path, reference):
    ckpt, blobs, fingerprint, follow, after = reference
    db = tmp_path / "m.db"
    store = Store(db)
    store.create_session("crash", fingerprint)
    store.close()
    engine = load_model(ckpt, window=32, sink=4)
    rng = random.Random(1)
    forks = subprocess.Popen([sys.executable, str(Path(__file__).with_name("writer.py")), "--fork"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    seen_progress = set()
    for _ in range(KILLS):
        forks.stdin.write(f"{db} {blobs} {10**6} crash\n")
        forks.stdin.flush()
        pid = int(forks.stdout.readline())
        time.sleep(rng.uniform(0, 0.25))  # some kills land before the first write, most during writes
        os.kill(pid, signal.SIGKILL)
        forks.stdin.write(f"wait {pid}\n")
        forks.stdin.flush()
        assert int(forks.stdout.readline()) == -signal.SIGKILL

        con = sqlite3.connect(db)
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        con.close()
        store = Store(db)
        seqs = [t["seq"] for t in store.turns("crash")]
        assert seqs == list(range(1, len(seqs) + 1))  # no gap, no half-written turn
        assert len(seqs) >= committed(Path(f"{db}.crash.log"))  # every reported commit survived
        snaps = store.snapshots("crash")  # each turn with its snapshot, retention applied in the same commit
        assert [s["turn_seq"] for s in snaps] == seqs[-KEEP_LAST:]
        if seqs:
            k = (len(seqs) - 1) % TURNS + 1
            blob = store.load_snapshot("crash")
            assert blob == (blobs / f"{k}.snap").read_bytes()
            engine.restore(blob)
            assert torch.equal(engine.feed(follow), after[k])
        store.close()
        seen_progress.add(len(seqs))
    forks.stdin.close()
    assert forks.wait(timeout=60) == 0
    assert len(seen_progress) > KILLS // 4  # the kills really landed at many different points


def test_readers_beside_two_writers_never_see_locked(tmp_path, reference):
    """Two processes write turns into two sessions of one database while this one lists and reads: the busy
    timeout and BEGIN IMMEDIATE queue them; no "database is locked" reaches anyone."""
    _, blobs, fingerprint, _, _ = reference
    db = tmp_path / "m.db"
    store = Store(db)
    for title in ("a", "b"):
        store.create_session(title, fingerprint)
    writers = [spawn(db, blobs, 10**6, title) for title in ("a", "b")]
    try:
        deadline = time.time() + 120  # reads go on until both writers are well under way (on a busy machine a
        reads, counts = 0, {}  # writer may take seconds to start), not for a fixed time
        while time.time() < deadline and not (reads > 20 and min(counts.values()) > 10):
            for row in store.sessions():
                if row["snapshots"]:
                    store.load_snapshot(row["id"])
                store.turns(row["id"])
            reads += 1
            counts = {row["title"]: row["turns"] for row in store.sessions()}
        for w in writers:
            assert w.poll() is None, w.stderr.read().decode()  # both were writing all along, neither failed
        assert reads > 20 and min(counts.values()) > 10, (reads, counts)
    finally:
        for w in writers:
            w.kill()
            w.wait()
    con = sqlite3.connect(db)
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"

"""One writer per session, with real processes: a second process waits a bounded time, then is refused with the
holder named; a holder killed with SIGKILL is taken over; a released lease is free at once; the same process may
ask again; `deltamem run` on a held session exits 1 saying who holds it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from deltamem.memory.errors import SessionBusy
from deltamem.memory.store import Store
from tests.repos import git_repo
from tests.test_app import deltamem

HOLD = """
import socket, sys, time
from deltamem.memory.store import Store
if sys.argv[4:] == ["elsewhere"]:  # a holder on another machine: its pid cannot be checked from here
    socket.gethostname = lambda: "another-machine"
store = Store(sys.argv[1])
lease = store.lease(sys.argv[2], "holder-test")
print("held", flush=True)
hold = float(sys.argv[3])
if hold < 0:
    sys.stdin.read()
else:
    time.sleep(hold)
store.close()
"""


def _holder(db, sid, hold: float, *where: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db), sid, str(hold), *where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.fixture(params=["sqlite", "postgres"])
def session(tmp_path, request):
    """A session in a SQLite file, or in PostgreSQL (tests/postgres.py), where the holder in the test below runs
    as if on another machine: PostgreSQL drops a dead holder's lock with its connection."""
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else tmp_path / "m.db"
    with Store(db) as store:
        sid = store.create_session("work", "fp")
    return db, sid


def test_busy_then_taken_over_after_a_kill(session, caplog):
    db, sid = session
    elsewhere = ["elsewhere"] if isinstance(db, str) else []
    holder = _holder(db, sid, -1, *elsewhere)
    try:
        with Store(db) as store:
            t0 = time.monotonic()
            on = "another-machine" if elsewhere else ""
            with pytest.raises(SessionBusy, match=rf"in use by holder-test \(pid {holder.pid} on {on}"):
                store.lease(sid, "test", wait_s=0.6)
            assert time.monotonic() - t0 >= 0.6  # it waited before refusing
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            with caplog.at_level("WARNING"):
                store.lease(sid, "test", wait_s=5)  # the dead holder's lease is taken over (once its server-side
                # connection has ended, on PostgreSQL: at once)
            assert any("taking over" in r.message for r in caplog.records)
            store.lease(sid, "test again", wait_s=0)  # the same process may ask again
    finally:
        holder.kill()


def test_a_waiting_process_gets_the_session_once_released(session):
    db, sid = session
    holder = _holder(db, sid, 1.0)  # releases after a second (store.close)
    with Store(db) as store:
        t0 = time.monotonic()
        store.lease(sid, "test", wait_s=20)
        assert time.monotonic() - t0 > 0.3
    holder.wait(timeout=30)
    with Store(db) as a:  # released at close: free at once for the next one
        a.lease(sid, "test", wait_s=0)


def test_run_on_a_held_session_says_who_holds_it(tmp_path):
    repo = git_repo(tmp_path / "shop", {"README.md": "# shop\n"})
    db = tmp_path / "m.db"
    r = deltamem("ingest", "--model", "random", "--window", "64", "--repo", str(repo), "--db", str(db))
    assert r.returncode == 0, r.stderr
    with Store(db) as store:
        sid = store.sessions()[0]["id"]
        assert store.db["leases"].count == 0  # the ingest gave its lease back when it exited
    holder = _holder(db, sid, -1)
    try:
        os.environ["DELTAMEM_LEASE_WAIT"] = "0.5"
        r = deltamem("run", "--model", "random", "--window", "64", "--repo", str(repo), "--db", str(db), "hi")
        assert r.returncode == 1 and "in use by holder-test" in r.stderr and "Traceback" not in r.stderr
    finally:
        os.environ.pop("DELTAMEM_LEASE_WAIT", None)
        holder.kill()
        holder.wait()
    r = deltamem(
        "run",
        "--model",
        "random",
        "--window",
        "64",
        "--repo",
        str(repo),
        "--db",
        str(db),
        "--max-new-tokens",
        "2",
        "hi",
    )
    assert r.returncode in (0, 3), r.stderr  # the killed holder's lease is taken over
    assert "taking over" in r.stderr
    r = deltamem("run", "--model", "random", "--window", "64", "--repo", str(repo), "--db", str(db), "--max-new-tokens",
                 "2", "hi")
    assert r.returncode in (0, 3) and "taking over" not in r.stderr, r.stderr  # the run before gave it back

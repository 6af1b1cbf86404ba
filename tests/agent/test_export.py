"""An exported session carries its conversation (the LangGraph thread) with its store rows: imported into another
database, its next run continues where the source's would, feeding the same tokens and reaching the same state
(no roll-back). Real repository, real databases, `deltamem` subprocesses."""

import json
import sqlite3

from deltamem.memory.store import Store
from tests.repos import git_repo
from tests.test_app import deltamem

ROLLBACK = "differs from what the model state consumed"


def run(repo, db, task):
    r = deltamem("run", "--model", "random", "--repo", str(repo), "--db", str(db), "--json", "--max-new-tokens", "4",
                 task)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    out.pop("timing"), out.pop("load_s")  # seconds, which differ from run to run
    return out, r.stderr


def sessions(db, *args):
    r = deltamem("sessions", *args, "--db", str(db), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def test_import_continues_the_conversation(tmp_path):
    repo = git_repo(tmp_path / "shop", {"README.md": "# Shop\nPrices live in prices.py.\n", "prices.py": "APPLE = 3\n"})
    src, twin, dst = tmp_path / "src.db", tmp_path / "twin.db", tmp_path / "dst.db"
    assert deltamem("ingest", "--model", "random", "--repo", str(repo), "--db", str(src)).returncode == 0
    first, _ = run(repo, src, "What does an apple cost?")

    out = sessions(src, "export", "shop", str(tmp_path / "shop.dmsession"))
    assert out["format"] == 2 and out["checkpoints"] > 0
    with sqlite3.connect(src) as a, sqlite3.connect(twin) as b:
        a.backup(b)  # the source as it was at export time, to run its next turn beside the import's
    assert sessions(dst, "import", str(tmp_path / "shop.dmsession"))["session"] == first["session"]

    here, here_err = run(repo, twin, "And a pear?")
    there, there_err = run(repo, dst, "And a pear?")
    assert ROLLBACK not in there_err and ROLLBACK not in here_err
    assert there == here  # same answer, same tokens fed, same tokens seen
    assert there["tokens_seen"] == first["tokens_seen"] + there["tokens_fed"]
    with Store(twin) as a, Store(dst) as b:
        assert a.load_snapshot("shop") == b.load_snapshot("shop")  # the same state, bit for bit
        assert [t["text"] for t in a.turns("shop")] == [t["text"] for t in b.turns("shop")]


def test_older_export_without_conversation_imports_with_a_warning(tmp_path):
    repo = git_repo(tmp_path / "shop", {"README.md": "# Shop\n"})
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    run(repo, src, "hello")
    path = tmp_path / "old.dmsession"
    sessions(src, "export", "shop", str(path))
    with sqlite3.connect(path) as con:  # what format 1 wrote: the store's tables only
        con.executescript("drop table export_info; drop table checkpoints; drop table writes;")
    r = deltamem("sessions", "import", str(path), "--db", str(dst))
    assert r.returncode == 0 and "older deltamem (format 1)" in r.stderr
    bumped = tmp_path / "new.dmsession"
    sessions(src, "export", "shop", str(bumped))
    with sqlite3.connect(bumped) as con:
        con.execute("update export_info set value = '99' where key = 'format'")
    r = deltamem("sessions", "import", str(bumped), "--db", str(tmp_path / "other.db"))
    assert r.returncode == 1 and "export format 99" in r.stderr and "Traceback" not in r.stderr


def test_import_into_the_repository_where_it_lives_on_this_machine(tmp_path):
    """The exporter's folder is not on this machine (here: the repository moved): the session is found by the
    folder's name in the new place and continues; asked for by id, it is adopted too."""
    import shutil

    repo = git_repo(tmp_path / "a" / "shop", {"README.md": "# Shop\n"})
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    first, _ = run(repo, src, "hello")
    sessions(src, "export", "shop", str(tmp_path / "shop.dmsession"))
    moved = tmp_path / "b" / "shop"
    moved.parent.mkdir()
    shutil.move(repo, moved)
    sessions(dst, "import", str(tmp_path / "shop.dmsession"))
    again, err = run(moved, dst, "and again")
    assert again["session"] == first["session"] and "now belongs to" in err
    assert again["tokens_seen"] == first["tokens_seen"] + again["tokens_fed"] and ROLLBACK not in err
    assert len(sessions(dst, "list")) == 1

    with sqlite3.connect(tmp_path / "shop.dmsession") as con:  # a damaged export_info is a clear refusal
        con.execute("delete from export_info where key = 'format'")
    r = deltamem("sessions", "import", str(tmp_path / "shop.dmsession"), "--db", str(tmp_path / "other.db"))
    assert r.returncode == 1 and "no format number" in r.stderr and "Traceback" not in r.stderr

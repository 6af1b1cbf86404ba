"""Sessions belong to a project: two real repositories with the same folder name get two sessions, each run
resumes its own, an ambiguous title is an error listing the candidates, and another project's session is not
resumed by id. All through `deltamem` subprocesses on one real database."""

import json

import pytest

from tests.repos import git_repo
from tests.test_app import deltamem


@pytest.fixture()
def two_apis(tmp_path):
    work = git_repo(tmp_path / "work" / "api", {"README.md": "# API at work\n", "app.py": "PORT = 8080\n"})
    old = git_repo(tmp_path / "old" / "api", {"README.md": "# An old API\n", "main.py": "PORT = 9090\n"})
    return work, old, tmp_path / "memory.db"


def run(repo, db, task, *extra):
    r = deltamem("run", "--model", "random", "--repo", str(repo), "--db", str(db), "--json", "--max-new-tokens", "2",
                 *extra, task)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def listed(db):
    r = deltamem("sessions", "list", "--json", "--db", str(db))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_same_folder_name_in_two_places_gives_two_sessions(two_apis):
    work, old, db = two_apis
    a = json.loads(run(old, db, "first").stdout)
    b = json.loads(run(work, db, "second").stdout)
    assert a["session"] != b["session"]
    rows = {r["id"]: r for r in listed(db)}
    assert {rows[a["session"]]["project"], rows[b["session"]]["project"]} == {str(old.resolve()), str(work.resolve())}
    assert rows[a["session"]]["title"] == rows[b["session"]]["title"] == "api"
    assert rows[b["session"]]["turns"] == 3  # system prompt, task, answer: nothing of the old repository's turn

    # each folder goes on resuming its own session, never creating a third one
    again = json.loads(run(old, db, "third").stdout)
    assert again["session"] == a["session"] and again["tokens_seen"] > a["tokens_seen"]
    assert len(listed(db)) == 2


def test_ambiguous_title_lists_the_candidates(two_apis):
    work, old, db = two_apis
    ids = {json.loads(run(repo, db, "hi").stdout)["session"]: repo for repo in (old, work)}
    r = deltamem("sessions", "show", "api", "--db", str(db))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "matches 2 sessions" in r.stderr
    for sid, repo in ids.items():
        assert sid in r.stderr and str(repo.resolve()) in r.stderr
    sid = next(iter(ids))
    assert deltamem("sessions", "show", sid, "--db", str(db)).returncode == 0  # the id is unambiguous


def test_another_projects_session_is_refused_by_id(two_apis):
    work, old, db = two_apis
    sid = json.loads(run(old, db, "hi").stdout)["session"]
    r = run(work, db, "hi", "--session", sid)
    assert r.returncode == 1 and "belongs to the project at" in r.stderr and str(old.resolve()) in r.stderr
    assert len(listed(db)) == 1  # nothing created

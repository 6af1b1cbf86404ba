"""End to end with the real default model on a real git repository: ingest (and re-ingest only what changed),
run a task, kill a run mid-generation, resume by session name: the restored state is bit-identical to the saved
snapshot and the next turn feeds only its new tokens."""

import json
import signal
import sqlite3
import subprocess
import time

import pytest

from deltamem.agent.prompt import MAP_PATH
from deltamem.agent.runner import Agent
from deltamem.memory.store import Store
from deltamem.model import load_model
from tests.test_app import CLI, deltamem


@pytest.fixture()
def repo(tmp_path):
    r = tmp_path / "shop"
    (r / "src").mkdir(parents=True)
    (r / "README.md").write_text("# Shop\nA tiny shop. Prices live in src/prices.py.\n")
    (r / "src" / "prices.py").write_text(
        "PRICES = {'apple': 3, 'pear': 5}\n\ndef price(item):\n    return PRICES[item]\n"
    )
    (r / ".gitignore").write_text("secret.txt\n")
    (r / "secret.txt").write_text("do not read me")
    (r / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", *cmd], cwd=r, check=True)
    return r


def test_ingest_run_kill_resume(repo, tmp_path):
    db = tmp_path / "memory.db"
    common = ["--repo", str(repo), "--session", "shop", "--db", str(db)]

    first = deltamem("ingest", *common, "--json")
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    assert (a["files"], a["unchanged"]) == (3, 0) and a["tokens"] > 0
    assert {s["path"]: s["why"] for s in a["skipped"]} == {"logo.png": "binary"}
    ledger = {p for (p,) in sqlite3.connect(db).execute("select path from ingested")}
    assert ledger == {"README.md", "src/prices.py", ".gitignore", MAP_PATH}  # secret.txt is git-ignored

    (repo / "src" / "prices.py").write_text("PRICES = {'apple': 4}\n")
    second = json.loads(deltamem("ingest", *common, "--json").stdout)
    assert (second["files"], second["unchanged"]) == (1, 2)
    assert second["tokens_seen"] == a["tokens_seen"] + second["tokens"]  # appended, not re-read

    stored = "select coalesce(sum(bytes), 0) from pieces"
    pieces_before = sqlite3.connect(db).execute(stored).fetchone()[0]
    ran = deltamem("run", *common, "--json", "--max-new-tokens", "6", "What does an apple cost?")
    assert ran.returncode in (0, 3), ran.stderr
    r = json.loads(ran.stdout)
    assert r["tokens_seen"] == second["tokens_seen"] + r["tokens_fed"] and r["snapshot"]
    # its timing: resumed from the ingest's state, fed and generated what it says, and saved only new pieces
    t = r["timing"]
    assert t["restored_tokens"] == second["tokens_seen"] and t["restore_s"] > 0
    assert t["prompt_tokens"] + t["decode_tokens"] + t.get("feed_tokens", 0) == r["tokens_fed"]
    assert 0 < t["decode_tokens"] <= 6 * (len(r["tool_calls"]) + 1)
    assert t["save_new_bytes"] == sqlite3.connect(db).execute(stored).fetchone()[0] - pieces_before
    assert 0 < t["save_new_bytes"] < t["save_bytes"]

    # a run killed while generating: nothing of it is committed, the session stays at its last snapshot
    killed = deltamem("run", *common, "--max-new-tokens", "2000", "Tell me everything.", wait=False)
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline and not line:  # wait until it streams tokens, then kill it
        line = killed.stdout.read(1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert line, killed.stderr.read()

    with Store(db) as store:
        saved = store.load_snapshot("shop")
        # one reply, without the look-up turn: fed = the question + the reply
        agent = Agent(load_model("default"), store, "shop", repo, max_new_tokens=6, max_steps=1, retrieve=False)
        assert agent.session.engine.snapshot() == saved  # resumed by name: the state is the saved one, bit for bit
        seen = agent.session.engine.tokens_seen
        prev_text = agent.session.text
        rendered = agent.session.template.render(
            [*agent.messages(), {"role": "user", "content": "And a pear?"}], add_generation_prompt=True
        )
        result = agent.run("And a pear?")
    # the killed run was never committed: the session resumed at the last saved turn, and the new turn fed only
    # its own question and reply
    assert rendered.startswith(prev_text)
    new_prompt = len(agent.session.tok.encode(rendered[len(prev_text) :]))
    assert result.tokens_fed == new_prompt + len(agent.session.engine.generated) < 200
    assert agent.session.engine.tokens_seen == seen + result.tokens_fed
    assert "Tell me everything." not in rendered


def test_bad_arguments_exit_codes(repo, tmp_path):
    db = ["--db", str(tmp_path / "m.db")]
    r = deltamem("run", "--repo", str(tmp_path / "nope"), *db, "task")
    assert r.returncode == 1 and "not a directory" in r.stderr and "Traceback" not in r.stderr
    r = deltamem("run", "--repo", str(repo), *db, "--max-steps", "0", "task")
    assert r.returncode == 1 and "--max-steps" in r.stderr
    r = deltamem("run", "--repo", str(repo), *db, "   ")
    assert r.returncode == 2 and "empty" in r.stderr
    r = deltamem("run", "--repo", str(repo), *db, "--approve", "sometimes", "task")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_rewind_and_fork_carry_the_conversation_with_the_state(repo, tmp_path):
    db = tmp_path / "memory.db"
    with Store(db) as store:
        agent = Agent(load_model("random", window=4096), store, "shop", repo, max_new_tokens=4, retrieve=False)
        agent.ingest()
        agent.run("first question")
        after_first = agent.messages()
        agent.run("second question")
        snaps = store.snapshots("shop")
        ingest_turn, first_turn = snaps[0]["turn_seq"], snaps[1]["turn_seq"]
        first_blob = store.load_snapshot("shop", snaps[1]["id"])
        ingest_blob = store.load_snapshot("shop", snaps[0]["id"])
        ingest_msgs = [m for m in after_first if m["role"] != "assistant"][:-1]

    r = deltamem("sessions", "rewind", "shop", "--to", str(first_turn), "--yes", "--db", str(db))
    assert r.returncode == 0, r.stderr
    r = deltamem("sessions", "fork", "shop", "--at", str(ingest_turn), "--title", "from-ingest", "--db", str(db))
    assert r.returncode == 0, r.stderr

    with Store(db) as store:
        rewound = Agent(load_model("random", window=4096), store, "shop", repo, max_new_tokens=4, retrieve=False)
        assert rewound.messages() == after_first and rewound.session.engine.snapshot() == first_blob
        text = rewound.session.text
        result = rewound.run("second question, again")
        assert rewound.session.restored_from == snaps[1]["id"]  # no roll-back was needed: only new tokens fed
        assert result.tokens_fed < 60 and rewound.session.text.startswith(text)

        forked = Agent(load_model("random", window=4096), store, "from-ingest", repo, max_new_tokens=4,
                       retrieve=False)
        assert forked.messages() == ingest_msgs and forked.session.engine.snapshot() == ingest_blob


def test_chat_repl_streams_and_quits(repo, tmp_path):
    r = subprocess.run(
        [
            *CLI,
            "chat",
            "--repo",
            str(repo),
            "--db",
            str(tmp_path / "m.db"),
            "--max-new-tokens",
            "3",
        ],
        input="hello there\n\n/quit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "/quit to leave" in r.stderr and r.stdout.count("you> ") == 3
    with Store(tmp_path / "m.db") as store:
        assert [t["role"] for t in store.turns("shop")][:2] == ["system", "user"]
        assert store.turns("shop")[1]["text"] == "hello there"

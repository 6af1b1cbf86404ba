"""What a run and an ingest write reaches the store together or not at all: the note tool's turn is committed in
the run's transaction (and dropped with a run that fails), and the ingest ledger records each file's tokens."""

import json

import pytest
import torch

from deltamem.agent.prompt import MAP_PATH, file_message
from deltamem.agent.runner import Agent
from deltamem.memory.store import Store
from deltamem.model import load_model
from deltamem.model.tokenizer import Tokenizer
from tests.repos import git_repo
from tests.test_app import deltamem

NOTE_CALL = '<tool_call>{"name": "note", "arguments": {"text": "the deploy key rotates on Mondays"}}</tool_call>'


@pytest.fixture()
def agent(tmp_path):
    repo = git_repo(tmp_path / "ops", {"README.md": "# Ops\n"})
    with Store(tmp_path / "memory.db") as store:
        yield Agent(load_model("random", window=64), store, "ops", repo, max_new_tokens=2, retrieve=False)


def scripted(agent, *replies):
    """The model's replies, in order (an exception is raised where it stands). The state does not consume them:
    these tests look at what is committed, not at the model."""
    it = iter(replies)

    def respond(messages, on_piece):
        r = next(it)
        if isinstance(r, Exception):
            raise r
        return r

    agent.session.respond = respond


def test_note_is_committed_with_the_run_or_not_at_all(agent):
    store, sid = agent.store, agent.session_id
    scripted(agent, NOTE_CALL, RuntimeError("the model failed"))
    with pytest.raises(RuntimeError):
        agent.run("remember the key rotation")
    assert store.turns(sid) == [] and store.search(sid, "rotates") == []  # nothing of the failed run
    agent.back_to_last_save()

    scripted(agent, NOTE_CALL, "Noted.")
    result = agent.run("remember the key rotation")
    assert [c["tool"] for c in result.tool_calls] == ["note"] and result.tool_calls[0]["ok"]
    turns = store.turns(sid)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "tool", "assistant", "note"]
    assert turns[-1]["text"] == "the deploy key rotates on Mondays"
    assert len({t["created"] for t in turns}) == 1  # one transaction: one timestamp
    assert store.snapshots(sid)[-1]["turn_seq"] == turns[-1]["seq"]  # the snapshot covers the note
    assert "note" in {h["role"] for h in store.search(sid, "Mondays")}


def test_ledger_records_each_files_tokens(tmp_path):
    files = {"README.md": "# Shop\nPrices live in src/prices.py.\n", "src/prices.py": "PRICES = {'apple': 3}\n"}
    repo = git_repo(tmp_path / "shop", files)
    db = tmp_path / "memory.db"
    r = deltamem("ingest", "--model", "random", "--repo", str(repo), "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    ingest = json.loads(r.stdout)
    shown = json.loads(deltamem("sessions", "show", "shop", "--db", str(db), "--json").stdout)
    tokens = {f["path"]: f["tokens"] for f in shown["ingested"]}
    assert tokens.pop(MAP_PATH) > 0  # the repository map, fed after the files
    tok = Tokenizer.cl100k_olmo()  # the random model's tokenizer; each file is one ChatML user message
    expected = {
        path: len(tok.encode(f"<|im_start|>user\n{file_message(path, text)['content']}<|im_end|>\n"))
        for path, text in files.items()
    }
    assert tokens == expected
    assert sum(tokens.values()) < ingest["tokens"]  # the rest is the session's system prompt and the map
    text = deltamem("sessions", "show", "shop", "--db", str(db)).stdout
    assert f"2 ingested files, {sum(tokens.values()):,} tokens" in text


def test_ingest_streams_files_in_whole_chunks_and_commits_by_time(tmp_path):
    """Files are fed as one token stream in whole prefill chunks (not one short feed per file); batches are
    committed once enough time has passed (commit_every_s=0: each batch), else together at the end. Either way the
    committed state is the one its stored ids give when fed from scratch in one call."""
    files = {f"doc{i}.md": f"# Document {i}\n" + f"line {i} of the case file\n" * (20 + 7 * i) for i in range(5)}
    repo = git_repo(tmp_path / "case", files)
    for name, every, snapshots in (("each", 0.0, 5), ("once", 3600.0, 1)):
        with Store(tmp_path / f"{name}.db") as store:
            engine = load_model("random", window=64, prefill_chunk=48)
            result = Agent(engine, store, name, repo).ingest(batch_bytes=1, commit_every_s=every, map_tokens=0)
            assert (result.files, len(store.snapshots(name))) == (5, snapshots)
            assert set(store.ingested(name)) == set(files)
            ids = store.load_tokens(name, store.snapshots(name)[-1]["id"])
            assert len(ids) == engine.tokens_seen == result.tokens
            reference = load_model("random", window=64, prefill_chunk=4096)
            reference.feed(ids, logits="none")
            probe = [5, 6, 7]
            assert torch.allclose(engine.feed(probe), reference.feed(probe), atol=1e-4)

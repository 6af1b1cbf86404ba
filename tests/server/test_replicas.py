"""Two `deltamem serve` processes on one PostgreSQL database (tests/postgres.py) and one object store, as two
replicas on two machines would run: a conversation served by the first continues on the second after the first is
killed, from the prefix state the first stored (not re-read), with the answer a server reading the prompt whole
gives; the killed replica's lease on the session is taken over at once."""

import pytest
from fastapi.testclient import TestClient

from deltamem.memory.store import Store
from deltamem.model import load_model
from deltamem.server.app import create_app
from tests.server.test_server import Server, wait_stored

pytest.importorskip("psycopg")


@pytest.mark.parametrize("when", ["between turns", "mid-reply"])
def test_a_conversation_moves_to_another_replica_when_its_first_dies(tmp_path, pg_url, monkeypatch, when):
    """The first replica is SIGKILLed after its answer's states are stored, or in the middle of streaming the next
    turn's reply (which the client never gets whole, and so sends again)."""
    monkeypatch.setenv("DELTAMEM_OBJECTS", f"file://{tmp_path / 'objects'}")  # shared storage for both replicas
    monkeypatch.setenv("DELTAMEM_LEASE_WAIT", "3")  # the dead replica's lease is free at once: no long wait
    convo = [{"role": "user", "content": "Where does the ring buffer live? " * 6}]
    first_replica = Server(pg_url)
    try:
        first = first_replica.client.chat.completions.create(model="random", messages=convo, max_tokens=4,
                                                             temperature=0, user="alice")  # fmt: skip
        wait_stored(pg_url, "serve:user:alice", first.usage.prompt_tokens - 1)  # stored just after the answer
        if when == "mid-reply":
            nxt = [*convo, {"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "Why?"}]  # fmt: skip
            stream = first_replica.client.chat.completions.create(model="random", messages=nxt, max_tokens=4000,
                                                                  temperature=0, user="alice", stream=True)  # fmt: skip
            for n, _ in enumerate(stream):
                if n == 3:
                    break
    finally:
        first_replica.proc.kill()  # SIGKILL: its connection, and so its lease, ends with it
        first_replica.proc.wait(timeout=30)
    convo += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Why?"}]
    second_replica = Server(pg_url)
    try:
        second = second_replica.client.chat.completions.create(model="random", messages=convo, max_tokens=5,
                                                               temperature=0, user="alice")  # fmt: skip
    finally:
        second_replica.stop()
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1  # restored, not re-read
    plain = TestClient(create_app(load_model("random", window=64), None, "random", prefix_cache=False))
    whole = plain.post("/v1/chat/completions", json={"messages": convo, "max_tokens": 5, "temperature": 0}).json()
    assert second.choices[0].message.content == whole["choices"][0]["message"]["content"]
    with Store(pg_url) as store:  # the pieces are in the object store, the rows in PostgreSQL
        assert store.objects is not None and list(store.objects.listing())
        assert store.db.execute("select count(*) from pieces where data is not null").fetchone()[0] == 0
        assert any(s["title"].startswith("serve:") and s["snapshots"] for s in store.sessions())

"""`deltamem serve --ray --replicas 2` as a real subprocess: a local Ray cluster, Ray Serve's HTTP proxy, two
replicas sharing one PostgreSQL database (tests/postgres.py) and one object store. A session's requests stay on one
replica (its next turn re-reads nothing); a stream is a stream through the proxy; when that replica is killed, the
session continues on another from the states the first stored, with the answer a server reading the prompt whole
gives."""

import os
import signal
import time

import pytest
from fastapi.testclient import TestClient

from deltamem.model import load_model
from deltamem.server.app import create_app
from deltamem.server.launch import Served
from tests.server.test_server import wait_stored

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")
pytest.importorskip("psycopg")


def ask(client, convo, user, retry=False, **kw):
    """The reply, its usage and the replica that gave it; with `retry`, a dead replica's requests are retried until
    Ray has routed the session elsewhere (a client's retry); without, any error fails the test."""
    deadline = time.monotonic() + 120
    while True:
        try:
            raw = client.chat.completions.with_raw_response.create(model="random", messages=convo, max_tokens=5,
                                                                  temperature=0, user=user, **kw)  # fmt: skip
            return raw.parse(), raw.headers["x-deltamem-replica"]
        except (openai.InternalServerError, openai.APIConnectionError):
            if not retry or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_sessions_stay_on_their_replica_and_move_when_it_dies(tmp_path, pg_url):
    env = {**os.environ, "DELTAMEM_OBJECTS": f"file://{tmp_path / 'objects'}", "DELTAMEM_LEASE_WAIT": "3"}
    with Served("--ray", "--replicas", "2", "--model", "random", "--window", "64", "--db", pg_url, env=env,
                timeout=300) as server:  # fmt: skip
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        alice = [{"role": "user", "content": "Where does the ring buffer live? " * 6}]
        first, r1 = ask(client, alice, "alice")
        alice += [first.choices[0].message.model_dump(include={"role", "content"}), {"role": "user", "content": "Why?"}]
        second, r2 = ask(client, alice, "alice")
        assert r2 == r1 and second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
        chunks = list(client.chat.completions.create(model="random", messages=alice, max_tokens=5, temperature=0,
                                                     user="alice", stream=True))  # fmt: skip
        text = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert len(text) > 1 and "".join(text) == second.choices[0].message.content  # streamed through the proxy
        for i in range(4):  # other sessions: each answered, each on one replica, its second turn not re-read
            convo = [{"role": "user", "content": f"Session {i} asks about the store. " * 4}]
            a, ra = ask(client, convo, f"u{i}")
            b, rb = ask(client, [*convo, a.choices[0].message.model_dump(include={"role", "content"}),
                                 {"role": "user", "content": "More."}], f"u{i}")  # fmt: skip
            assert rb == ra and b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 1
        alice += [second.choices[0].message.model_dump(include={"role", "content"}),
                  {"role": "user", "content": "And then?"}]  # fmt: skip
        wait_stored(pg_url, "serve:user:alice", second.usage.prompt_tokens - 1)  # stored just after the answer
        os.kill(int(r1.rsplit(":", 1)[1]), signal.SIGKILL)  # alice's replica dies
        third, r3 = ask(client, alice, "alice", retry=True)
        assert r3 != r1
        assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 1  # from the store
    plain = TestClient(create_app(load_model("random", window=64), None, "random", prefix_cache=False))
    whole = plain.post("/v1/chat/completions", json={"messages": alice, "max_tokens": 5, "temperature": 0}).json()
    assert third.choices[0].message.content == whole["choices"][0]["message"]["content"]


def test_the_routing_key_is_the_session_the_app_files_the_request_under():
    """server/app.py's session_of: the header's name (100 characters), else "user:" and str(user), else default;
    the API key's tenant only where keys are set (without keys, any Authorization header is one tenant)."""
    from deltamem.server.ray_serve import session_key

    no_keys = [session_key({"authorization": f"Bearer {k}"}, b'{"user": "alice"}', False) for k in ("a", "b")]
    assert no_keys[0] == no_keys[1] == "-/user:alice"
    keyed = [session_key({"authorization": f"Bearer {k}"}, b'{"user": "alice"}', True) for k in ("a", "b")]
    assert keyed[0] != keyed[1] and all(k.endswith("/user:alice") for k in keyed)
    assert session_key({}, b'{"user": 123}', False) == "-/user:123"  # the app files a number as its text
    assert session_key({}, b'{"user": ""}', False) == session_key({}, b"", False) == "-/default"
    assert session_key({"x-deltamem-session": "s" * 150}, b'{"user": "x"}', False) == "-/" + "s" * 100
    assert session_key({}, b'{"user": "' + b"u" * 150 + b'"}', False) == "-/user:" + "u" * 100
    assert session_key({}, b"not json", False) == "-/default"

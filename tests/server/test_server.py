"""`deltamem serve` as a real process, driven by the official `openai` client: chat and text completions, streaming
equal to the whole answer, the prefix cache (a conversation's next turn reuses the state of the last; a restarted
server still hits it), tool rendering, and errors in OpenAI's shape; plus the loopback-only default."""

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deltamem.model import load_model
from deltamem.server.app import create_app
from deltamem.server.launch import Served
from tests.test_app import deltamem

openai = pytest.importorskip("openai")


class Server(Served):
    """The random model served with a small window, an `openai` client pointed at it."""

    def __init__(self, db: Path, *extra: str):
        super().__init__("--model", "random", "--window", "64", "--db", str(db), *extra, timeout=180)
        self.client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0)


def test_openai_client_against_a_real_server(tmp_path):
    server = Server(tmp_path / "m.db")
    try:
        c = server.client
        assert [m.id for m in c.models.list().data] == ["random"]
        convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a Gated DeltaNet?"}]
        first = c.chat.completions.create(model="random", messages=convo, max_tokens=6, temperature=0)
        assert first.choices[0].finish_reason in ("length", "stop") and first.usage.completion_tokens <= 6
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        convo += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And its state size?"},
        ]
        second = c.chat.completions.create(model="random", messages=convo, max_tokens=6, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1  # not re-read
        pieces = [
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(
                model="random", messages=convo, max_tokens=6, temperature=0, stream=True
            )
            if ch.choices
        ]
        assert "".join(pieces) == second.choices[0].message.content
        text = c.completions.create(model="random", prompt="def add(a, b):", max_tokens=4, temperature=0)
        assert text.choices[0].text and text.usage.prompt_tokens > 0
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "read_file",
                    "description": "read a file",
                    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
                },
            }
        ]
        with_tools = c.chat.completions.create(model="random", messages=convo, tools=tools, max_tokens=4, temperature=0)
        assert with_tools.choices[0].message.role == "assistant"
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="gpt-4", messages=convo, max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="random", messages=[], max_tokens=2)
    finally:
        server.stop()
    log = server.log_text()  # the access log: a line a request, its tokens and times, errors with their status
    assert any(f"session=default prompt={second.usage.prompt_tokens} cached=" in line and " 200" in line
               for line in log.splitlines()), log  # fmt: skip
    assert "POST /v1/chat/completions 404" in log and "POST /v1/chat/completions 400" in log
    again = Server(tmp_path / "m.db")  # restarted: the stored states still serve
    try:
        r = again.client.chat.completions.create(model="random", messages=convo, max_tokens=6, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 1
        assert r.choices[0].message.content == second.choices[0].message.content
    finally:
        again.stop()
    listed = deltamem("sessions", "list", "--db", str(tmp_path / "m.db"), "--json")
    assert "serve:default" in listed.stdout


def test_errors_in_openai_shape():
    app = create_app(load_model("random", window=64), None, "random", api_key="k1")
    client = TestClient(app)
    ok = {"Authorization": "Bearer k1"}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/chat/completions", headers=ok, json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", headers=ok, content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", headers={**ok, "Content-Length": str(64 << 20)}, content=b"{}")
    assert r.status_code == 413
    r = client.get("/v1/nothing", headers=ok)
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/health").json() == {"status": "ok"}  # no key needed to check liveness
    r = client.post("/v1/completions", headers=ok, json={"prompt": "x", "max_tokens": 0})
    assert r.status_code == 400


def test_serving_off_loopback_needs_a_key():
    for extra in ((), ("--api-key", " ")):  # none, or an empty one
        r = deltamem("serve", "--model", "random", "--host", "0.0.0.0", "--port", "1", *extra)
        assert r.returncode == 1 and "--api-key" in r.stderr and "Traceback" not in r.stderr


def test_prefix_states_from_memory_match_reading_the_prompt_whole(tmp_path):
    """A conversation's next turn, its prefix state restored from host memory after another conversation ran in
    between, answers as a server without prefix states (--no-prefix-cache) that reads the prompt whole; the kept
    states reach the SQLite store."""
    from deltamem.memory.store import Store

    with Store(tmp_path / "m.db") as store, TestClient(create_app(load_model("random", window=64), store,
                                                                  "random")) as cached:  # fmt: skip
        plain = TestClient(create_app(load_model("random", window=64), None, "random", prefix_cache=False))

        def ask(client, messages):
            r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        a = [{"role": "user", "content": "Where is the tokenizer defined? " * 8}]
        first = ask(cached, a)
        ask(cached, [{"role": "user", "content": "Something else entirely."}])  # the engine now holds another state
        a += [first["choices"][0]["message"], {"role": "user", "content": "And where is it tested?"}]
        second = ask(cached, a)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
        whole = ask(plain, a)
        assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
        cached.app.state.prefixes.flush()  # the writer stores them after the answers
        (row,) = [s for s in store.sessions() if s["title"] == "serve:default"]
        assert len(store.snapshots(row["id"])) >= 4  # prompt and reply states of three requests


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = [  # (path, body or raw bytes, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    *[("/v1/chat/completions", {**CHAT, "n": n}, 400, "n") for n in (0, 17, 1.5, "2", True)],
    *[("/v1/chat/completions", {**CHAT, key: value}, 400, key) for key, value in (
        ("presence_penalty", 2.5), ("frequency_penalty", "1"), ("logit_bias", [5]), ("logit_bias", {"a": 1}),
        ("logit_bias", {"5": 101}), ("logit_bias", {"-5": 1}), ("logit_bias", {"5": True}), ("logprobs", "yes"),
        ("logit_bias", {"1000000": 1}), ("top_logprobs", 21), ("top_logprobs", 2),  # (without logprobs: true)
        ("max_tokens", 301), ("parallel_tool_calls", "no"))],  # max_tokens over the context (the prompt limit)
    *[("/v1/completions", {"prompt": "x", key: value}, 400, key) for key, value in (
        ("logprobs", 6), ("logprobs", True), ("echo", "yes"))],
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 2}, 400, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 400}]}, 400, None),  # over the limit
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": "read_file"}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": 5}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"function": {"name": "f", "parameters": []}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [],
                              "tool_choice": {"type": "function", "function": {"name": "absent"}}}, 400, "tool_choice"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format"),
    # shapes that once got a plain-text 500: numbers out of range or of the wrong type, malformed parts and calls
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 60000 + b"]" * 60000 + b"}", 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}', 400,
     "max_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 400 + b"}",
     400, "max_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature"),
    *[("/v1/chat/completions", {**CHAT, "seed": seed}, 400, "seed") for seed in ("7", 1.5, 2**80, [1], True)],
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": "usage"}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": 5}]}]}, 400, "messages"),
    *[("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "", "tool_calls": calls}]}, 400,
       "messages") for calls in ("read", 5, {"function": {}}, [{"function": "read"}],
                                 [{"function": {"name": "read", "arguments": 5}}])],
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, 400, "messages"),  # answers no call
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice"),  # and no tools
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"function": "f"}}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
]  # fmt: skip


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving():
    client = TestClient(create_app(load_model("random", window=64), None, "random", max_prompt_tokens=300))
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    for path, body, status, param in BAD_REQUESTS:
        r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body, err)
        assert client.post("/v1/chat/completions", json=ok).status_code == 200  # still serving
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}
    r = client.post("/v1/chat/completions", json={**ok, "tools": [tool], "tool_choice": "none"})
    assert r.status_code == 200
    r = client.post("/v1/chat/completions", json={**ok, "tools": [tool], "tool_choice": {"type": "function",
                                                  "function": {"name": "read_file"}}})  # fmt: skip
    assert r.status_code == 200


def test_nulls_mean_the_default_and_routes_answer_in_openais_shape():
    client = TestClient(create_app(load_model("random", window=64), None, "random", max_prompt_tokens=300))
    base = {**CHAT, "max_tokens": 3, "temperature": 0}
    greedy = client.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    for nulls in ({"n": None, "top_p": None, "seed": None, "stop": None, "tools": None, "response_format": None},
                  {"max_completion_tokens": None}, {"top_p": 0, "temperature": 1.0}):  # top_p 0: greedy
        r = client.post("/v1/chat/completions", json={**base, **nulls})
        assert r.status_code == 200, (nulls, r.text)
        assert r.json()["choices"][0]["message"]["content"] == greedy, nulls  # max_tokens 3 and greedy kept
    assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "temperature": None}).status_code == 200
    assert client.get("/v1/models/random").json()["id"] == "random"
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    wrong = client.delete("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
    for asked in (True, False):  # usage in its own last chunk (no choices) only when asked, as OpenAI sends it
        r = client.post("/v1/chat/completions", json={**base, "stream": True,
                                                      "stream_options": {"include_usage": asked}})  # fmt: skip
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        assert [e for e in events if "usage" in e] == ([events[-1]] if asked else [])
        if asked:
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    long = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 400}],
                                                     "stream": True})  # fmt: skip
    assert long.status_code == 400 and "limit" in long.json()["error"]["message"]  # a status, not an SSE event


def test_langchain_chatopenai_and_concurrent_clients(tmp_path):
    """LangChain's ChatOpenAI talks to the server unchanged (invoke, stream, bound tools), and clients sending at
    once each get the answer they get alone (requests are served one at a time, in order)."""
    lco = pytest.importorskip("langchain_openai")
    import threading

    server = Server(tmp_path / "m.db")
    try:
        url = f"http://127.0.0.1:{server.port}/v1"
        llm = lco.ChatOpenAI(base_url=url, api_key="unused", model="random", temperature=0, max_tokens=6, max_retries=0)
        convo = [("system", "Be brief."), ("user", "What is a Gated DeltaNet?")]
        msg = llm.invoke(convo)
        messages = [{"role": role, "content": text} for role, text in convo]
        direct = server.client.chat.completions.create(model="random", max_tokens=6, temperature=0, messages=messages)
        assert msg.content == direct.choices[0].message.content and msg.content
        assert "".join(c.content for c in llm.stream(convo)) == msg.content
        tool = {"type": "function", "function": {"name": "read_file", "description": "read a file",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}  # fmt: skip
        assert llm.bind_tools([tool]).invoke(convo).type == "ai"

        asks = [[{"role": "user", "content": f"Count to {i}."}] for i in range(6)]

        def ask(m):
            r = server.client.chat.completions.create(model="random", messages=m, max_tokens=5, temperature=0)
            return r.choices[0].message.content

        alone = [ask(m) for m in asks]
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(asks[i]))) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [together[i] for i in range(6)] == alone
    finally:
        server.stop()


def wait_stored(db: Path | str, session: str, tokens: int, timeout: float = 60) -> None:
    """Until the server's session (its title in the store, e.g. "serve:default") holds a state of at least `tokens`
    tokens, read from the database (the prefix cache's writer stores a request's states just after its answer)."""
    from deltamem.memory.errors import NotFound
    from deltamem.memory.store import Store

    deadline = time.monotonic() + timeout
    while True:
        with Store(db) as store:
            try:
                if any(s["tokens_seen"] >= tokens for s in store.snapshots(session)):
                    return
            except NotFound:
                pass
        assert time.monotonic() < deadline, f"no state of {tokens} tokens stored in {session}"
        time.sleep(0.1)


def _whole_and_restarted(db: Path, messages: list[dict], stored_prompt_tokens: int, max_tokens: int):
    """The database a stopped server left passes integrity_check, and a new server on it hits the prompt state the
    first one stored; returns the new server's answer."""
    import sqlite3

    with sqlite3.connect(db) as con:
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    again = Server(db)
    try:
        r = again.client.chat.completions.create(model="random", messages=messages, max_tokens=max_tokens,
                                                 temperature=0)
    finally:
        again.stop()
    assert r.usage.prompt_tokens_details.cached_tokens >= stored_prompt_tokens - 1
    return r


def test_killed_mid_stream_then_restarted(tmp_path):
    """SIGKILL while a reply streams: the database stays whole, the restarted server serves the last committed
    prefix state, and its answer is the one a server without prefix states gives."""

    db = tmp_path / "m.db"
    server = Server(db)
    convo = [{"role": "user", "content": "Describe the memory store. " * 6}]
    try:
        first = server.client.chat.completions.create(model="random", messages=convo, max_tokens=4, temperature=0)
        reply = first.choices[0].message
        wait_stored(db, "serve:default", first.usage.prompt_tokens - 1)
        convo += [{"role": "assistant", "content": reply.content}, {"role": "user", "content": "More."}]
        stream = server.client.chat.completions.create(
            model="random", messages=convo, max_tokens=4000, temperature=0, stream=True
        )
        for n, _ in enumerate(stream):
            if n == 3:
                break
        server.proc.kill()  # SIGKILL, mid-reply
        server.proc.wait(timeout=30)
    finally:
        if server.proc.poll() is None:
            server.stop()
    r = _whole_and_restarted(db, convo, first.usage.prompt_tokens, max_tokens=5)
    plain = TestClient(create_app(load_model("random", window=64), None, "random", prefix_cache=False))
    whole = plain.post("/v1/chat/completions", json={"messages": convo, "max_tokens": 5, "temperature": 0}).json()
    assert r.choices[0].message.content == whole["choices"][0]["message"]["content"]


def test_batched_decode_gives_each_client_its_answer_alone(tmp_path):
    """With --batch-decode, concurrent replies are decoded together (fewer steps than tokens), ending at different
    lengths and at stop strings, and each is the answer a server decoding one reply at a time gives alone."""
    import threading

    batched_app = create_app(load_model("random", window=64), None, "random", batch_decode=True)
    batched = TestClient(batched_app)
    serial = TestClient(create_app(load_model("random", window=64), None, "random", batch_decode=False))
    asks = [{"messages": [{"role": "user", "content": f"Count to {i}." * (1 + i % 3)}], "max_tokens": 4 + 3 * i,
             "temperature": 0} for i in range(6)]  # fmt: skip
    asks[2]["stop"] = ["e"]
    asks[5] |= {"temperature": 0.8, "seed": 7}

    def ask(client, body):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"], r.json()["usage"]

    alone = [ask(serial, b) for b in asks]
    together: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(batched, asks[i]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i][:2] for i in range(6)] == [a[:2] for a in alone]
    assert len({a[1] for a in alone}) > 2  # replies of different lengths left the batch at different steps
    assert batched_app.state.batcher.steps < sum(a[1] for a in alone)  # some steps decoded several replies
    # next turns resume the states the batched replies left, as the serial server's do
    reply_states = 0
    for i, (text, _, first) in together.items():
        turn = asks[i]["messages"] + [{"role": "assistant", "content": text}, {"role": "user", "content": "Go"}]
        body = {"messages": turn, "max_tokens": 6, "temperature": 0}
        nxt = ask(batched, body)
        assert nxt == ask(serial, body)
        reply_states += nxt[2]["prompt_tokens_details"]["cached_tokens"] == first["total_tokens"]
    assert reply_states >= 3  # (the others' text tokenizes back to other ids than the reply's: a shorter hit)


PAINT = {"type": "function", "function": {"name": "paint", "parameters": {"type": "object", "properties": {
    "color": {"enum": ["red", "green"]}, "coats": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["color"]}}}  # fmt: skip
WAIT = {"type": "function", "function": {"name": "wait", "parameters": {"type": "object", "properties": {
    "long": {"type": "boolean"}}}}}  # fmt: skip


@pytest.mark.parametrize("batched", [False, True])
def test_tool_choice_required_or_named_always_gives_a_call_its_schema_accepts(batched):
    """A random-weight model never writes a tool call; with tool_choice "required" or a named function the guide
    holds it to one, on the one-reply path and in the decode batch, and jsonschema accepts the arguments."""
    jsonschema = pytest.importorskip("jsonschema")
    client = TestClient(create_app(load_model("random", window=64), None, "random", batch_decode=batched))
    base = {"messages": [{"role": "user", "content": "Paint the fence."}], "tools": [PAINT, WAIT], "max_tokens": 60}
    free = client.post("/v1/chat/completions", json={**base, "temperature": 0}).json()["choices"][0]
    assert free["finish_reason"] != "tool_calls"  # "auto": left to the model, which calls nothing
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (PAINT, WAIT)}
    for choice, names in [("required", {"paint", "wait"}), ({"type": "function", "function": {"name": "wait"}},
                                                             {"wait"})]:  # fmt: skip
        for seed in range(3):
            r = client.post("/v1/chat/completions", json={**base, "tool_choice": choice, "temperature": 1.0,
                                                          "seed": seed})  # fmt: skip
            assert r.status_code == 200, r.text
            out = r.json()["choices"][0]
            assert out["finish_reason"] == "tool_calls", out
            (call,) = out["message"]["tool_calls"]
            assert call["function"]["name"] in names
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "strnig"}}}}}  # fmt: skip
    r = client.post("/v1/chat/completions", json={**base, "tools": [bad], "max_tokens": 4})
    assert r.status_code == 200, r.text  # a schema the grammar compiler refuses: answered, unguided


@pytest.mark.parametrize(("text", "n"), [("abc", 3), ("abc<tool", 3), ("abc<tool_call>\n{", 3), ("a<", 1),
                                         ("<", 0), ("x < y", 5), ("a<t", 1), ("a<tx", 4), ("", 0)])  # fmt: skip
def test_a_stream_holds_back_only_what_may_open_a_call(text, n):
    from deltamem.server.api import releasable

    assert releasable(text) == n


@pytest.mark.parametrize("batched", [False, True])
def test_with_tools_offered_text_streams_and_calls_come_as_tool_calls_deltas(batched):
    """Tools offered: a reply without calls streams piece by piece (not in one chunk at the end), the same text as
    the whole answer; a required call comes as a tool_calls delta whose arguments the schema accepts."""
    jsonschema = pytest.importorskip("jsonschema")
    client = TestClient(create_app(load_model("random", window=64), None, "random", batch_decode=batched))
    base = {"messages": [{"role": "user", "content": "Paint the fence."}], "tools": [PAINT, WAIT], "max_tokens": 24,
            "temperature": 0}  # fmt: skip

    def events(body):
        r = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert r.status_code == 200, r.text
        return [json.loads(x[6:])["choices"][0] for x in r.text.split("\n\n") if x.startswith('data: {"id"')]

    whole = client.post("/v1/chat/completions", json=base).json()["choices"][0]
    assert whole["finish_reason"] != "tool_calls"
    pieces = [e["delta"]["content"] for e in events(base) if e["delta"].get("content")]
    assert len(pieces) > 3 and "".join(pieces) == whole["message"]["content"]
    asked = {**base, "tool_choice": "required", "temperature": 1.0, "seed": 1, "max_tokens": 60}
    required = events(asked)
    deltas = [d for e in required for d in e["delta"].get("tool_calls") or []]
    assert required[-1]["finish_reason"] == "tool_calls" and {d["index"] for d in deltas} == {0}
    head, fragments = deltas[0], [d["function"]["arguments"] for d in deltas[1:]]
    assert head["id"] and head["type"] == "function" and head["function"]["arguments"] == ""  # the name first
    assert len(fragments) > 1 and all(fragments)  # then the arguments, piece by piece
    schema = {"paint": PAINT, "wait": WAIT}[head["function"]["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads("".join(fragments)), schema)
    (call,) = client.post("/v1/chat/completions", json=asked).json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == head["function"]["name"]  # the same call as the whole answer's
    assert json.loads(call["function"]["arguments"]) == json.loads("".join(fragments))


ANSWER = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "coats": {"type": "integer",
          "minimum": 1, "maximum": 3}}, "required": ["color", "coats"], "additionalProperties": False}  # fmt: skip


@pytest.mark.parametrize("batched", [False, True])
def test_response_format_answers_are_json_their_schema_accepts(batched):
    """response_format json_schema and json_object, whole and streamed, on the one-reply path and in the decode
    batch: a random-weight model, which left alone writes noise, answers with JSON that json.loads reads and
    jsonschema accepts (or, for json_object, whose strings have no bound, JSON cut at max_tokens)."""
    jsonschema = pytest.importorskip("jsonschema")
    client = TestClient(create_app(load_model("random", window=64), None, "random", batch_decode=batched))
    base = {"messages": [{"role": "user", "content": "Which color? Answer in JSON."}], "max_tokens": 60,
            "temperature": 1.0}  # fmt: skip
    formats = [({"type": "json_schema", "json_schema": {"name": "paint", "schema": ANSWER, "strict": True}}, ANSWER),
               ({"type": "json_object"}, {"type": "object"})]  # fmt: skip
    for fmt, schema in formats:
        for seed in range(2):
            r = client.post("/v1/chat/completions", json={**base, "response_format": fmt, "seed": seed})
            assert r.status_code == 200, r.text
            out = r.json()["choices"][0]
            if out["finish_reason"] == "stop":
                jsonschema.validate(json.loads(out["message"]["content"]), schema)
            else:  # json_object's keys and strings are unbounded: a random model may run to max_tokens
                assert schema == {"type": "object"} and out["message"]["content"].startswith("{"), out
            streamed = client.post("/v1/chat/completions", json={**base, "response_format": fmt, "seed": seed,
                                                                 "stream": True})  # fmt: skip
            events = [json.loads(x[6:]) for x in streamed.text.split("\n\n") if x.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
            assert text == out["message"]["content"]  # streamed piece by piece, the same answer


LONG = [{"role": "user", "content": "Tell me everything about the memory store. " * 4}]


def _read_some(stream, n: int = 5) -> None:
    for i, _ in enumerate(stream):
        if i == n:
            return
    raise AssertionError("the reply ended before the client left")


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_a_client_that_leaves_mid_stream_frees_the_server_at_once(tmp_path, batched):
    """A streaming client closes its connection after a few chunks of a long reply (Ctrl-C in a CLI, a dropped
    connection): the next request is answered (it waited forever when the abandoned reply kept the engine's lock),
    and no state of the partial reply is stored as a prefix state."""
    from deltamem.memory.store import Store

    server = Server(tmp_path / "m.db", "--batch-decode" if batched else "--no-batch-decode")
    try:
        stream = server.client.chat.completions.create(model="random", messages=LONG, max_tokens=20_000,
                                                       temperature=0, stream=True)
        _read_some(stream)
        stream.close()  # the client leaves, 20k tokens before the reply's end
        prompt_tokens = server.client.chat.completions.create(  # the same prompt, answered: the engine is free
            model="random", messages=LONG, max_tokens=1, temperature=0, timeout=60).usage.prompt_tokens
        short = [{"role": "user", "content": "Hi."}]
        r = server.client.chat.completions.create(model="random", messages=short, max_tokens=3, temperature=0,
                                                  timeout=60)
        assert r.usage.completion_tokens >= 1
    finally:
        server.stop()
    with Store(tmp_path / "m.db") as store:
        kept = [s["tokens_seen"] for s in store.snapshots("serve:default")]
    assert kept and max(kept) <= prompt_tokens + 1  # prompts and the 1-token reply; nothing of the 20k-token one


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(tmp_path, batched):
    """A client waiting for a whole (not streamed) answer times out and closes its connection: the reply stops at
    once (its access-log line says so, with the tokens it had), and the next request is answered."""
    server = Server(tmp_path / "m.db", "--batch-decode" if batched else "--no-batch-decode")
    try:
        with pytest.raises(openai.APITimeoutError):
            server.client.chat.completions.create(model="random", messages=LONG, max_tokens=100_000, temperature=0,
                                                  timeout=3)  # fmt: skip
        r = server.client.chat.completions.create(model="random", messages=[{"role": "user", "content": "Hi."}],
                                                  max_tokens=3, temperature=0, timeout=120)  # fmt: skip
        assert r.usage.completion_tokens >= 1
    finally:
        server.stop()
    left = [line for line in server.log_text().splitlines() if "the client left" in line]
    assert len(left) == 1, server.log_text()
    assert 0 < int(left[0].split("completion=")[1].split()[0]) < 100_000


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_sigterm_mid_stream_exits_cleanly_within_seconds(tmp_path, batched):
    """SIGTERM (a service manager's stop) while a long reply streams: the process exits 0 within 5 s and leaves a
    whole database, which the next server reads."""
    import signal

    db = tmp_path / "m.db"
    server = Server(db, "--batch-decode" if batched else "--no-batch-decode")
    try:
        first = server.client.chat.completions.create(model="random", messages=LONG, max_tokens=2, temperature=0)
        stream = server.client.chat.completions.create(model="random", messages=LONG, max_tokens=20_000,
                                                       temperature=0, stream=True)
        _read_some(stream)
        t = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=30)
        took = time.monotonic() - t
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    err = server.log_text()
    assert code == 0 and took < 5, (code, took, err)
    assert "Traceback" not in err and "ERROR" not in err, err  # the stream ended with an error event, not a cancel
    _whole_and_restarted(db, LONG, first.usage.prompt_tokens, max_tokens=2)


def test_prefix_states_serve_only_their_own_session_and_tenant(tmp_path):
    """Two API keys are two tenants: a session name is each key's own, and a prompt's state serves only the session
    that sent it (no hit, so no faster miss, for anyone else), in memory and after a restart from the store;
    --share-prefixes lets every session reuse the states in memory."""
    from deltamem.memory.store import Store

    prompt = {"messages": [{"role": "user", "content": "The vault code is 4471. " * 20}], "max_tokens": 2,
              "temperature": 0}  # fmt: skip

    def cached(client, key: str, user: str) -> int:
        r = client.post("/v1/chat/completions", json={**prompt, "user": user},
                        headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with Store(tmp_path / "m.db") as store, TestClient(create_app(load_model("random", window=64), store, "random",
                                                                  api_key=["k1", "k2"])) as client:  # fmt: skip
        assert cached(client, "k1", "alice") == 0
        assert cached(client, "k1", "alice") > 0  # her own next request hits
        assert cached(client, "k2", "alice") == 0  # another tenant's "alice" is another session
        assert cached(client, "k1", "bob") == 0  # another session of the same tenant
        assert client.post("/v1/chat/completions", json=prompt, headers={"Authorization": "Bearer k3"}).status_code \
            == 401  # fmt: skip
        posing = client.post("/v1/chat/completions", json=prompt, headers={"Authorization": "Bearer k1",
                             "X-Deltamem-Session": "user:alice"})  # a header may not name a `user` session
        assert posing.status_code == 400  # fmt: skip
    with Store(tmp_path / "m.db") as store, TestClient(create_app(load_model("random", window=64), store, "random",
                                                                  api_key=["k1", "k2"])) as client:  # restarted: the
        # stored states keep their owners
        assert cached(client, "k2", "carol") == 0 and cached(client, "k2", "alice") > 0  # k2's own, stored
        assert cached(client, "k1", "bob") > 0 and cached(client, "k1", "dave") == 0
    shared = TestClient(create_app(load_model("random", window=64), None, "random", api_key="k1",
                                   share_prefixes=True))  # fmt: skip
    assert cached(shared, "k1", "alice") == 0 and cached(shared, "k1", "bob") > 0


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_answers_never_wait_for_the_store_and_a_store_behind_loses_only_the_oldest_states(tmp_path, batched):
    """The memory database is held by another writer (a real SQLite lock, from another connection) while six
    requests come: each is answered all the same, as a server without prefix states answers it, and a session
    stored by an earlier server resumes from its stored state meanwhile (read beside the writer, which waits). The
    states wait for the writer in device memory within the cache's byte budget (four states here); the oldest
    beyond it go unstored. Once the database is free the rest are stored: the newest ones, the last prompt's
    included, which a restarted server resumes from."""
    import sqlite3
    import threading

    from deltamem.memory.store import Store

    engine = load_model("random", window=64)
    budget = 4 * engine.state_bytes()
    db = tmp_path / "m.db"
    asks = [[{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * (2 + i)}] for i in range(6)]
    plain = TestClient(create_app(load_model("random", window=64), None, "random", prefix_cache=False))

    def ask(client, messages, tokens=4, session="default"):
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": tokens, "temperature": 0},
                        headers={"X-Deltamem-Session": session})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()

    def states(store) -> int:
        return sum(len(store.snapshots(s["id"])) for s in store.sessions() if s["title"].startswith("serve:"))

    old = [{"role": "user", "content": "An earlier server's conversation. " * 5}]
    with Store(db) as store, TestClient(create_app(load_model("random", window=64), store, "random")) as earlier:
        said = ask(earlier, old, session="old")
    old += [said["choices"][0]["message"], {"role": "user", "content": "And now?"}]
    with Store(db, busy_timeout_ms=600_000) as store, TestClient(create_app(
            engine, store, "random", cache_bytes=budget, batch_decode=batched)) as client:  # fmt: skip
        ask(client, [{"role": "user", "content": "Hello."}])  # the session exists
        client.app.state.prefixes.flush()
        before = states(store)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("begin immediate")  # nobody else writes until it ends
        try:
            answers: list[dict] = []

            def work():
                answers.extend(ask(client, a) for a in asks)  # the writer now waits for the database
                answers.append(ask(client, old, session="old"))

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            worker.join(timeout=120)
            assert len(answers) == len(asks) + 1, "an answer waited for the store"
        finally:
            holder.execute("rollback")
            holder.close()
        resumed = answers.pop()
        assert resumed["usage"]["prompt_tokens_details"]["cached_tokens"] >= said["usage"]["prompt_tokens"] - 1
        for a, got in zip([*asks, old], [*answers, resumed], strict=True):
            assert got["choices"][0]["message"]["content"] == ask(plain, a)["choices"][0]["message"]["content"]
        client.app.state.prefixes.flush()
        unstored = client.app.state.prefixes.unstored
        kept = 2 * (len(asks) + 1)  # a prompt and a reply state each
        assert unstored >= kept - 5  # four wait, one may be in the writer
        assert states(store) == before + kept - unstored  # every one not given up
    last = asks[-1] + [answers[-1]["choices"][0]["message"], {"role": "user", "content": "Go on."}]
    with Store(db) as store, TestClient(create_app(load_model("random", window=64), store, "random")) as again:
        r = ask(again, last, 2)  # restarted: the newest states were the ones stored
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= answers[-1]["usage"]["prompt_tokens"] - 1
    assert r["choices"][0]["message"]["content"] == ask(plain, last, 2)["choices"][0]["message"]["content"]


def test_the_writer_makes_its_snapshot_header_at_start_not_while_requests_run(tmp_path, monkeypatch):
    """safetensors serialises a whole state to make a snapshot's header, holding the GIL all along (at 7B shapes
    1.4-1.8 s in which the scheduler thread cannot run): the server does it once as it starts, for the layout every
    state of a bounded window has, and the states its requests leave are stored without it. What is stored is
    what safetensors writes for the same state."""
    from deltamem.memory.store import Store
    from deltamem.model import snapcache

    made, save = [], snapcache.st_save
    monkeypatch.setattr(snapcache, "_HEADS", snapcache.OrderedDict())  # no layout known to this process yet
    monkeypatch.setattr(snapcache, "st_save", lambda tensors: made.append(1) or save(tensors))
    with Store(tmp_path / "m.db") as store, TestClient(create_app(load_model("random", window=64), store,
                                                                  "random")) as client:  # fmt: skip
        at_start = len(made)
        for i in range(3):
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"{i}: " +
                            "tell me about the sea " * 20}], "max_tokens": 3, "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
        client.app.state.prefixes.flush()
        assert at_start == 1 and len(made) == 1  # made at start, once; none while requests ran
        session = next(s for s in store.sessions() if s["title"].startswith("serve:"))
        snaps = store.snapshots(session["id"])
        assert len(snaps) == 6  # a prompt's and a reply's state per request
        fresh = load_model("random", window=64)
        for row in snaps:
            blob = store.load_snapshot(session["id"], row["id"])
            fresh.restore(blob)
            assert fresh.snapshot() == blob  # Engine.snapshot(): safetensors' own file of the whole state


def test_stored_states_stay_within_their_budget_and_gc_gives_the_space_back(tmp_path):
    """500 requests over 50 `user` values, 8 MB of states allowed: the file stops growing (its pieces within the
    budget; sizes measured on the real SQLite file), each user's last state still serves its next turn, and
    `sessions gc --serve-mb` trims a store written without a budget, VACUUM giving the space back."""
    import sqlite3

    from deltamem.memory.store import Store

    def pieces_bytes(db: Path) -> int:
        with sqlite3.connect(db) as con:
            return con.execute("select coalesce(sum(bytes), 0) from pieces").fetchone()[0]

    def talk(client, users: int, turns: int) -> dict[str, list[dict]]:
        convos: dict[str, list[dict]] = {}
        for i in range(users * turns):
            user = f"u{i % users}"
            msgs = convos.setdefault(user, [{"role": "user", "content": f"I am {user}. Tell me a story."}])
            r = client.post("/v1/chat/completions", json={"messages": msgs, "user": user, "max_tokens": 3,
                                                          "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
            msgs += [r.json()["choices"][0]["message"], {"role": "user", "content": f"more {i}"}]
        return convos

    budget = 8 << 20
    sizes = []
    named = [{"role": "user", "content": "Remember this session."}]
    with Store(tmp_path / "b.db") as store, TestClient(create_app(load_model("random", window=64), store, "random",
                                                                  store_bytes=budget)) as client:  # fmt: skip
        first = client.post("/v1/chat/completions", json={"messages": named, "max_tokens": 3, "temperature": 0},
                            headers={"X-Deltamem-Session": "kept"}).json()  # fmt: skip
        for _ in range(2):  # 250 requests, then 250 more
            convos = talk(client, 50, 5)
            client.app.state.prefixes.flush()
            sizes.append(pieces_bytes(tmp_path / "b.db"))
        assert max(sizes) <= budget + (1 << 20)  # within the budget (and what one request adds before its trim)
        assert sizes[1] <= sizes[0] * 1.1  # a plateau
        r = client.post("/v1/chat/completions", json={"messages": convos["u49"], "user": "u49", "max_tokens": 2})
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the most recent states stay
    with Store(tmp_path / "b.db") as store, TestClient(create_app(load_model("random", window=64), store, "random",
                                                                  store_bytes=budget)) as client:
        # restarted (nothing in memory): the named session's last state stays
        turn = named + [first["choices"][0]["message"], {"role": "user", "content": "Still there?"}]
        r = client.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 2},
                        headers={"X-Deltamem-Session": "kept"})  # fmt: skip
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["total_tokens"] - 1
    with Store(tmp_path / "free.db") as store, TestClient(create_app(load_model("random", window=64), store,
                                                                     "random")) as client:  # no budget: it grows
        talk(client, 50, 1)
    grown = pieces_bytes(tmp_path / "free.db")
    assert grown > 1.5 * budget
    r = deltamem("sessions", "gc", "--serve-mb", "8", "--db", str(tmp_path / "free.db"), "--json")
    assert r.returncode == 0, r.stderr
    assert pieces_bytes(tmp_path / "free.db") <= budget and json.loads(r.stdout)["bytes_after"] < grown


@pytest.mark.parametrize("reply", [
    'Sure. <tool_call>\n{"name": "paint", "arguments": {"color": "red", "coats": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "wait", "arguments": {}}\n</tool_call>',
    "<tool_call>\n<function=paint>\n<parameter=color>\nred\n</parameter>\n<parameter=coats>\n2\n</parameter>\n"
    "</function>\n</tool_call><tool_call>\n<function=wait>\n</function>\n</tool_call>",
], ids=["json", "xml"])  # fmt: skip
def test_calls_stream_as_a_name_then_argument_fragments_whatever_the_syntax(reply):
    """A reply fed to CallStream a character at a time (as a stream decodes it): each call's deltas are its name,
    then fragments whose concatenation is the arguments the parser reads from the whole reply (agent/parse.py)."""
    from deltamem.agent.parse import parse_tool_calls
    from deltamem.server.api import CallStream

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (PAINT, WAIT)}
    stream, deltas = CallStream(schemas), []
    for i in range(1, len(reply) + 1):
        deltas += stream.deltas(reply[:i])
    deltas += stream.deltas(reply, final=True)
    want = parse_tool_calls(reply, schemas=schemas).calls
    for i, call in enumerate(want):
        mine = [d for d in deltas if d["index"] == i]
        assert mine[0]["function"] == {"name": call["name"], "arguments": ""} and mine[0]["id"]
        assert json.loads("".join(d["function"]["arguments"] for d in mine[1:])) == call["arguments"]
    assert len([d for d in deltas if d["index"] == 0]) > 3  # the first call's arguments came in several pieces
    one = CallStream(schemas, parallel=False)
    assert {d["index"] for d in one.deltas(reply, final=True)} == {0}


@pytest.mark.parametrize("batched", [False, True], ids=["one_at_a_time", "batched"])
def test_metrics_count_what_the_clients_were_given(tmp_path, batched):
    """GET /metrics, read by prometheus_client's own parser, against what the clients got: the requests by status,
    their tokens as each answer's usage gives them, a time to first token each; batched, a decoded token for each
    completion token; and the prefix states, once written, as many as the real SQLite store holds."""
    from prometheus_client.parser import text_string_to_metric_families

    from deltamem.memory.store import Store

    with Store(tmp_path / "m.db") as store, TestClient(create_app(load_model("random", window=64), store, "random",
                                                                  batch_decode=batched)) as client:  # fmt: skip
        usages = []
        for i, stream in enumerate((False, True, False)):
            body = {"model": "random", "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 3 + i,
                    "temperature": 0}  # fmt: skip
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
            chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            usages.append(chunks[-1]["usage"] if stream else r.json()["usage"])
        assert client.post("/v1/chat/completions", json={"model": "random", "messages": []}).status_code == 400
        client.app.state.prefixes.flush()
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}  # fmt: skip
        kept = store.db.execute("select count(*) from session_snapshots").fetchone()[0]
    assert got["deltamem_requests_total", (("status", "200"),)] == 3
    assert got["deltamem_requests_total", (("status", "400"),)] == 1
    for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        assert got["deltamem_tokens_total", (("kind", kind),)] == sum(u[field] for u in usages)
    assert got["deltamem_time_to_first_token_seconds_count", ()] == 3
    assert kept > 0 and got["deltamem_prefix_states_total", (("result", "stored"),)] == kept
    assert got["deltamem_prefix_writer_seconds_total", (("phase", "snapshot"),)] > 0
    if batched:
        assert got["deltamem_decode_tokens_total", ()] == sum(u["completion_tokens"] for u in usages)
        assert got["deltamem_scheduler_seconds_total", (("work", "decode"),)] > 0
    else:
        assert ("deltamem_decode_steps_total", ()) not in got or got["deltamem_decode_steps_total", ()] == 0

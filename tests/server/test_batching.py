"""Continuous batching (server/batching.py): a long prompt arriving while another reply decodes is read a chunk at
a time between that reply's decode steps, and both answers are the ones a server doing one request at a time gives
(greedy, the random model; each answer checked against its own request served alone)."""

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from deltamem.model import load_model
from deltamem.server.app import create_app


def ask(client: TestClient, body: dict) -> str:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_a_prompt_read_in_chunks_between_the_steps_of_a_running_reply():
    app = create_app(load_model("random", window=64), None, "random", batch_decode=True, prefill_chunk=16)
    batched = TestClient(app)
    serial = TestClient(create_app(load_model("random", window=64), None, "random", batch_decode=False))
    running = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 400, "temperature": 0}
    long = {"messages": [{"role": "user", "content": "Describe the memory store. " * 30}], "max_tokens": 6,
            "temperature": 0}  # fmt: skip
    texts: dict[str, str] = {}
    first_token = threading.Event()
    batcher = app.state.batcher

    def stream_running() -> None:
        with batched.stream("POST", "/v1/chat/completions", json={**running, "stream": True}) as r:
            assert r.status_code == 200
            parts = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    parts.append(delta.get("content") or "")
                    if parts[-1]:
                        first_token.set()
            texts["running"] = "".join(parts)

    t = threading.Thread(target=stream_running)
    t.start()
    assert first_token.wait(120)
    texts["long"] = ask(batched, long)
    t.join()
    trace = list(batcher.trace)
    chunks_while_decoding = [i for i, (kind, active) in enumerate(trace) if kind == "job" and active]
    assert len(chunks_while_decoding) >= 10  # about 360 prompt tokens in chunks of 16, the other reply decoding
    # never two chunks in a row while a reply was decoding: a decode step came between
    assert all(trace[i + 1][0] == "step" for i in chunks_while_decoding)
    # each answer as served alone
    assert texts["long"] == ask(serial, long)
    assert texts["running"] == ask(serial, running)
    # with no reply decoding, a prompt is read in the engine's own chunks (512 tokens on a CPU), not 16 at a time
    other = {**long, "messages": [{"role": "user", "content": "Explain the prefix cache. " * 30}]}
    before = len(batcher.trace)
    assert ask(batched, other) == ask(serial, other)
    assert [kind for kind, _ in list(batcher.trace)[before:]].count("job") == 1


def test_a_client_gone_before_its_first_token_ends_its_reply():
    """A stream closed right after its first chunk (the prompt read on the scheduler, its reply already in the
    decode batch): the reply leaves the batch at the next step instead of decoding to max_tokens."""
    import time

    app = create_app(load_model("random", window=64), None, "random", batch_decode=True)
    client = TestClient(app)
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 100_000, "temperature": 0,
            "stream": True}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")  # the role chunk: the prompt is read
    batcher = app.state.batcher
    deadline = time.monotonic() + 60
    while (batcher.active or batcher.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batcher.active and not batcher.waiting and batcher.steps < 5000


def test_a_batched_reply_state_is_stored_by_its_own_request(tmp_path):
    """The state a batched reply ends with is stored (by the prefix cache's writer, which the app's shutdown waits
    for): a server started afresh on the same file resumes the next turn from it, the reply included."""
    from deltamem.memory.store import Store

    db = tmp_path / "m.db"
    asks = [[{"role": "user", "content": f"Count to {i}." * (1 + i % 3)}] for i in range(6)]
    firsts = []
    engine = load_model("random", window=64)
    for convo in asks:  # each the only request of its server
        with Store(db) as store, TestClient(create_app(engine, store, "random", batch_decode=True)) as first:
            r = first.post("/v1/chat/completions", json={"messages": convo, "max_tokens": 5, "temperature": 0})
            firsts.append(r.json())
    hits = 0
    with Store(db) as store, TestClient(create_app(load_model("random", window=64), store, "random",
                                                   batch_decode=True)) as again:  # fmt: skip
        for convo, r in zip(asks, firsts, strict=True):
            turn = convo + [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "Go"}]  # fmt: skip
            r2 = again.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 2, "temperature": 0}).json()
            hits += r2["usage"]["prompt_tokens_details"]["cached_tokens"] == r["usage"]["total_tokens"]
    assert hits >= 3  # (a reply whose text tokenizes back to other ids than its own gets a shorter hit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_batch_is_made_and_captured_at_start_and_serves_as_one_at_a_time():
    """On a GPU the server makes the decode batch's rows and captures its step for 1, 2, 4, ... rows as it starts;
    four concurrent requests are then answered with no further capture, from replayed graphs, each as a server
    doing one request at a time answers it (float32, the same device)."""
    from concurrent.futures import ThreadPoolExecutor

    def engine():
        return load_model("random", device="cuda", dtype="float32", window=64)

    app = create_app(engine(), None, "random", batch_decode=True)
    batcher = app.state.batcher
    rows = batcher.batch._rows
    assert rows == batcher.max_batch >= 4 and batcher.batch.captures == rows.bit_length()
    captures, replayed = batcher.batch.captures, batcher.batch.graph_steps
    serial = TestClient(create_app(engine(), None, "random", batch_decode=False))
    bodies = [{"messages": [{"role": "user", "content": f"Tell me about {w}. " * (3 + i)}], "max_tokens": 12,
               "temperature": 0} for i, w in enumerate(["rivers", "stars", "glass", "bread"])]  # fmt: skip
    with TestClient(app) as batched, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: ask(batched, b), bodies))
    assert batcher.batch.captures == captures and batcher.batch.graph_steps > replayed
    assert answers == [ask(serial, b) for b in bodies]

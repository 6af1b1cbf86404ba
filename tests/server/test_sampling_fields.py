"""OpenAI's sampling fields on `deltamem serve`, each against a reference outside the server: log-probabilities
against a fresh engine's log-softmax over the whole text, n choices against n single requests with their seeds,
logit_bias against the token it forces, penalties against the engine's own sampler loop, echo and the default reply
length against the prompt and the context. Through the official `openai` client (its parsing of each field) over
the app in-process, one server decoding replies one at a time and one batching them."""

import pytest
import torch
from fastapi.testclient import TestClient

from deltamem.model import load_model
from deltamem.model.sampling import Sampler
from deltamem.server.app import create_app

openai = pytest.importorskip("openai")

PROMPT = "def add(a, b):"


def client_of(batched: bool, **kw) -> tuple[TestClient, object]:
    http = TestClient(create_app(load_model("random", window=64), None, "random", batch_decode=batched, **kw))
    return http, openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http, max_retries=0)


def reference_logprobs(ids: list[int], reply: list[int]) -> torch.Tensor:
    """log-softmax of each reply token after the prompt and the reply before it, from one forward of the whole
    text on a fresh engine, over the ids a reply may hold (those the tokenizer can decode)."""
    eng = load_model("random", window=64)
    logits = eng.feed(ids + reply, logits="all")[len(ids) - 1 : -1]
    if eng.unknown_ids() is not None:
        logits = logits.index_fill(1, eng.unknown_ids(), float("-inf"))
    return torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_logprobs_are_the_models_own(batched):
    http, client = client_of(batched)
    eng = load_model("random", window=64)
    ids = eng.tokenizer.encode(PROMPT)
    r = client.completions.create(model="random", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    list(eng.generate(ids, max_new_tokens=8, stop_ids=[]))  # greedy: the reply's ids
    reply = eng.generated[: len(lp.tokens)]
    ref = reference_logprobs(ids, reply)
    assert [eng.tokenizer.decode_bytes([t]).decode("utf-8", "replace") for t in reply] == lp.tokens
    assert lp.token_logprobs == pytest.approx([float(ref[i, t]) for i, t in enumerate(reply)], abs=1e-4)
    for i, alts in enumerate(lp.top_logprobs):
        assert len(alts) == 3 and max(alts.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)  # greedy
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="random", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 and bytes(t.bytes).decode("utf-8", "replace") == t.token
               for t in content)  # fmt: skip
    streamed = client.chat.completions.create(model="random", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                              stream=True)  # fmt: skip
    got = [t for ch in streamed if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in got] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model="random", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None
    chunks = [c.choices[0] for c in client.completions.create(model="random", prompt=PROMPT, max_tokens=8,
                                                              temperature=0, logprobs=2, stream=True)]  # fmt: skip
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


@pytest.mark.parametrize("stream", [False, True])
def test_penalties_and_logprobs_under_a_guide_on_the_decode_graph_path(stream):
    """The decode-graph path (what --compile and a GPU run) with a guided JSON answer, penalties and top_logprobs:
    the answer is its schema's JSON, every log-probability a finite number (a guide's mask leaves fewer
    alternatives than asked, never -inf ones)."""
    import json

    eng = load_model("random", window=64)
    eng.fast_decode = True  # the device-side loop, run eagerly on the CPU
    http = TestClient(create_app(eng, None, "random", batch_decode=False))
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
              "additionalProperties": False}  # fmt: skip
    body = {"messages": [{"role": "user", "content": "Colour?"}], "max_tokens": 30, "temperature": 0,
            "presence_penalty": 1.0, "frequency_penalty": 0.5, "logprobs": True, "top_logprobs": 5, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}  # fmt: skip
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith('data: {"id"')]
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        entries = [t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["content"]]
    else:
        content = r.json()["choices"][0]["message"]["content"]
        entries = r.json()["choices"][0]["logprobs"]["content"]
    assert json.loads(content)["color"] in ("red", "green")
    values = [t["logprob"] for t in entries] + [a["logprob"] for t in entries for a in t["top_logprobs"]]
    assert entries and all(isinstance(v, float) and v > float("-inf") for v in values)


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_n_choices_are_the_single_requests_with_their_seeds(batched):
    http, client = client_of(batched)
    msgs = [{"role": "user", "content": "Name a colour."}]
    many = client.chat.completions.create(model="random", messages=msgs, max_tokens=10, temperature=1.0, seed=40,
                                          n=3)  # fmt: skip
    alone = [client.chat.completions.create(model="random", messages=msgs, max_tokens=10, temperature=1.0, seed=40 + k)
             for k in range(3)]  # fmt: skip
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in many.choices}) > 1  # the choices differ: the check is not vacuous
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    texts = ["", "", ""]
    reasons = [None, None, None]
    for ch in client.chat.completions.create(model="random", messages=msgs, max_tokens=10, temperature=1.0, seed=40,
                                             n=3, stream=True):  # fmt: skip
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.message.content for c in many.choices]
    assert reasons == [c.finish_reason for c in many.choices]
    # the next turn still resumes the state the request left
    turn = msgs + [{"role": "assistant", "content": many.choices[2].message.content}, {"role": "user", "content": "?"}]
    nxt = client.chat.completions.create(model="random", messages=turn, max_tokens=2, temperature=0)
    assert nxt.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_logit_bias_penalties_echo_and_the_default_length(batched):
    http, client = client_of(batched, max_prompt_tokens=40)
    eng = load_model("random", window=64)
    ids = eng.tokenizer.encode(PROMPT)
    tok = next(t for t in range(300, 400) if eng.tokenizer.decode_bytes([t]).isalpha())  # a word piece
    forced = client.completions.create(model="random", prompt=PROMPT, max_tokens=5, temperature=0.7, seed=1,
                                       logit_bias={str(tok): 100})  # fmt: skip
    assert forced.choices[0].text == eng.tokenizer.decode_bytes([tok]).decode() * 5
    penalised = client.completions.create(model="random", prompt=PROMPT, max_tokens=12, temperature=0,
                                          presence_penalty=1.5, frequency_penalty=2.0, logprobs=0)  # fmt: skip
    sampler = Sampler(presence_penalty=1.5, frequency_penalty=2.0)
    want = "".join(eng.generate(ids, max_new_tokens=12, stop_ids=[], sampler=sampler))
    assert penalised.choices[0].text == want
    eng.reset()
    assert want != "".join(eng.generate(ids, max_new_tokens=12, stop_ids=[]))  # the penalties changed the reply
    echoed = client.completions.create(model="random", prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT) and len(echoed.choices[0].text) > len(PROMPT)
    eos = {str(t): -100 for t in eng.config.eos_ids}  # no end of sequence: the reply runs to its room
    whole = client.completions.create(model="random", prompt=PROMPT, temperature=0, logit_bias=eos)
    assert whole.usage.completion_tokens == 40 - len(ids) and whole.choices[0].finish_reason == "length"

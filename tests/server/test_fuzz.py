"""Bodies built by hypothesis from the API's own field names with values of every JSON type (nested, out of range,
of the wrong type, null): every answer is a 200 with a well-formed completion or a 4xx in OpenAI's error shape,
never a 500 or a server that stops answering."""

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltamem.model import load_model
from deltamem.server.app import create_app

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
          "stream_options", "stop", "seed", "user", "tools", "tool_choice", "parallel_tool_calls", "response_format",
          "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "echo"]  # fmt: skip

numbers = st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | numbers | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["role", "content", "type", "function", "name", "arguments", "text", "include_usage",
                     "json_schema", "schema", "parameters", "tool_calls", "5"]), inner, max_size=3),
    max_leaves=8)  # fmt: skip
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"])},
                                optional={"content": values, "tool_calls": values})  # fmt: skip
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6).flatmap(
    lambda b: st.just(b) | st.lists(message, min_size=1, max_size=3).map(lambda m: {**b, "messages": m}))


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(load_model("random", window=64), None, "random", max_prompt_tokens=64))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, chat=st.booleans())
def test_any_body_gets_an_answer_or_an_openai_error(client, body, chat):
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"], (body, err)
    elif body.get("stream") is True:
        events = [x for x in r.text.split("\n\n") if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and all(json.loads(x[6:]) for x in events[:-1])
    else:
        assert r.json()["choices"], body
    ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200  # still serving


@pytest.mark.parametrize("stream", [1, "yes", [True], {"on": True}])
def test_a_stream_flag_that_is_no_boolean_is_an_openai_error(client, stream):
    """What the fuzz above found once: `stream: 1` streamed, where OpenAI answers 400."""
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text

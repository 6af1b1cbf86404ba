"""/openapi.json documents the request bodies of /v1/chat/completions and /v1/completions (server/bodies.py) and is a
valid OpenAPI document; the schema rejects the malformed bodies the server answers with a 400 (but those only the
server's state can tell); and schemathesis, driven by the document, fuzzes both routes in-process: bodies that fit
the schema and bodies that break it each get a 200 with a completion or a 4xx in OpenAI's error shape, never a 500,
and the server keeps serving."""

import json

import jsonschema
import pytest
import referencing
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.config import SchemathesisConfig

from deltamem.model import load_model
from deltamem.server.app import create_app
from tests.server.test_server import BAD_REQUESTS

ROUTES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}
SHARED = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logit_bias", "user"}  # fmt: skip
FIELDS = {
    "ChatCompletionRequest": SHARED | {"messages", "max_completion_tokens", "tools", "tool_choice",
                                       "parallel_tool_calls", "response_format", "logprobs", "top_logprobs"},
    "CompletionRequest": SHARED | {"prompt", "echo", "logprobs"},
}  # fmt: skip
# 400s that a schema cannot tell: they depend on the model's vocabulary, the prompt's length, other fields' values
BY_THE_SERVER = {"logit_bias": [{"1000000": 1}], "top_logprobs": [2], "echo": [True], "messages": ["x " * 400],
                 "tool_choice": ["required", {"type": "function", "function": {"name": "absent"}}]}  # fmt: skip


@pytest.fixture(scope="module")
def app():
    app = create_app(load_model("random", window=64), None, "random", max_prompt_tokens=64)
    warm = TestClient(app).post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})  # outside the fuzzer's
    assert warm.status_code == 200  # timing (a first request's read timeout)
    return app


@pytest.fixture(scope="module")
def document(app):
    return TestClient(app).get("/openapi.json").json()


@pytest.fixture(scope="module")
def fuzzed(app):
    """The API as schemathesis loads it: /openapi.json read through the app itself (ASGI, in-process)."""
    # whole streams read (schemathesis stops at 20 events by default: a stream of n choices with log-probabilities
    # has more, and would lack its [DONE])
    return schemathesis.openapi.from_asgi("/openapi.json", app,
                                          config=SchemathesisConfig.from_dict({"max-stream-events": 100_000}))


def validator(doc: dict, name: str) -> jsonschema.Draft202012Validator:
    """A JSON Schema validator of one of the document's components (its $refs resolved within the document)."""
    resource = referencing.Resource.from_contents(doc, referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource("urn:openapi", resource)
    return jsonschema.Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{name}"}, registry=registry)


def test_openapi_json_is_valid_and_documents_both_bodies(document):
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 meta-schema
    assert document["openapi"].startswith("3.1")
    components = document["components"]["schemas"]
    for schema in components.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    for path, name in ROUTES.items():
        post = document["paths"][path]["post"]
        assert post["requestBody"]["required"] is True
        assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert "422" not in post["responses"]  # never FastAPI's validation errors: 4xx in OpenAI's shape
        assert post["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        body = components[name]
        assert set(body["properties"]) == FIELDS[name], name
        assert all(field.get("description") for key, field in body["properties"].items()), name
        assert body["properties"]["model"]["enum"] == ["random"]  # the server's own model
        assert body["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 64}
        assert body["properties"]["temperature"]["anyOf"] == [{"type": "number", "minimum": 0, "maximum": 2},
                                                              {"type": "null"}]  # fmt: skip
    assert set(components["ChatCompletionRequest"]["required"]) == {"model", "messages"}
    assert set(components["CompletionRequest"]["required"]) == {"model", "prompt"}
    roles = components["ChatCompletionRequest"]["properties"]["messages"]["items"]["discriminator"]["mapping"]
    assert set(roles) == {"developer", "system", "user", "assistant", "tool"}


def test_the_schema_rejects_the_malformed_bodies_the_server_does(document):
    """Each body of test_server.py's BAD_REQUESTS (the server's 400s and 404s) breaks the documented schema too,
    but for those only the server can tell; and bodies the server answers with a 200 fit it."""
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}
    good = {
        "/v1/chat/completions": [
            {"model": "random", "messages": [{"role": "user", "content": "hi"}]},
            {"model": "random", "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "read a.py"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "x = 1"}],
             "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "read_file"}},
             "parallel_tool_calls": False, "max_completion_tokens": 8, "stream": True,
             "stream_options": {"include_usage": True}, "stop": ["\n"], "seed": 7, "n": 2, "logprobs": True,
             "top_logprobs": 3, "logit_bias": {"5": -100}, "temperature": None, "user": "me"},
            {"model": "random", "messages": [{"role": "user", "content": "paint?"}], "response_format": {
                "type": "json_schema", "json_schema": {"name": "Paint", "strict": True, "schema": {"type": "object"}}}},
        ],
        "/v1/completions": [{"model": "random", "prompt": ["def f():"], "echo": True, "logprobs": None, "stop": "\n"}],
    }  # fmt: skip
    for path, examples in good.items():
        for body in examples:
            validator(document, ROUTES[path]).validate(body)
    checked = 0
    for path, body, _, param in BAD_REQUESTS:
        if isinstance(body, bytes):  # not JSON, or JSON python cannot parse (1e999, NaN, nested 60000 deep)
            continue
        body = {"model": "random", **body}
        fits = validator(document, ROUTES[path]).is_valid(body)
        value = (body["messages"][0]["content"] if param is None else body[param]) if param != "model" else None
        assert fits == (value in BY_THE_SERVER.get(param or "messages", [])), (path, body)
        checked += 1
    assert checked > 40


def openai_shaped(response, body) -> None:
    """A 200 with a completion (a whole answer or a stream ending in [DONE]) or a 4xx in OpenAI's error shape."""
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], (body, err)
    elif isinstance(body, dict) and body.get("stream") is True:
        assert not getattr(response, "stream_cut_short", False), (body, "the stream outlasted the request timeout")
        events = [x for x in response.text.split("\n\n") if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and all(json.loads(x[6:]) for x in events[:-1]), (body, response.text)
    else:
        assert response.status_code == 200 and response.json()["choices"], (body, response.text)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data(), path=st.sampled_from(sorted(ROUTES)), mode=st.sampled_from(list(GenerationMode)))
def test_schemathesis_fuzzes_both_routes_from_the_openapi_document(app, fuzzed, data, path, mode):
    case = data.draw(fuzzed[path]["POST"].as_strategy(generation_mode=mode), label="case")
    response = case.call(timeout=60)
    event(f"{path} {mode.value}: {response.status_code}")  # --hypothesis-show-statistics tells what was reached
    openai_shaped(response, case.body)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    again = TestClient(app).post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert again.status_code == 200  # still serving


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """Found by the fuzzer: logits / 1e-270 are infinite, and sampling from them on the host raised (a 500); on the
    decode step it drew token 0 rather than the likeliest."""
    client = TestClient(create_app(load_model("random", window=64, compile_decode=False), None, "random",
                                   max_prompt_tokens=64))  # fmt: skip
    body = {"prompt": "0", "max_tokens": 4, "seed": 1}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for tiny in (2.7578536739485765e-270, 1e-6):
        r = client.post("/v1/completions", json={**body, "temperature": tiny})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, r.text

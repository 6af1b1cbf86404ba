"""ChatDeltamem against langchain-tests' standard unit tests, and the standard integration tests that a local
random-weight model can pass (invoke, stream, batch, conversation, stop sequences, usage metadata); the ones
that need a model that follows instructions (tool calling, structured output) are switched off by the suite's
own capability flags."""

import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from deltamem.agent.chat_model import ChatDeltamem
from deltamem.agent.parse import format_tool_call
from deltamem.agent.protocol import Offer


class _Deltamem:
    """What both standard suites need to know about ChatDeltamem."""

    @property
    def chat_model_class(self):
        return ChatDeltamem

    @property
    def chat_model_params(self):
        return {"model": "random"}

    @property
    def has_structured_output(self):
        return False


class TestChatDeltamemUnit(_Deltamem, ChatModelUnitTests):
    pass


class TestChatDeltamemIntegration(_Deltamem, ChatModelIntegrationTests):
    @property
    def has_tool_calling(self):
        return False  # random weights never choose a tool on purpose; parsing is tested below

    @property
    def supports_json_mode(self):
        return False

    @property
    def supports_model_override(self):
        return False  # one instance, one loaded checkpoint


def test_tool_calls_come_back_parsed_and_history_is_reused():
    llm = ChatDeltamem(max_tokens=4)
    history = [SystemMessage("be brief"), HumanMessage("price of apple?")]
    first = llm.invoke(history)
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    # the next call extends the same conversation: only its new part is fed
    call = AIMessage(content="", tool_calls=[{"name": "price", "args": {"item": "apple"}, "id": "c0"}])
    rendered = llm._turn([*history, first, call], Offer()).messages
    assert rendered[-1]["content"] == format_tool_call("price", {"item": "apple"})
    second = llm.invoke([*history, first, HumanMessage("and pear?")])
    u = second.usage_metadata
    assert u["input_token_details"]["cache_read"] == first.usage_metadata["total_tokens"]  # all of call 1
    assert u["input_tokens"] > u["input_token_details"]["cache_read"]
    offer = Offer([{"type": "function", "function": {"name": "price"}}])
    parsed = llm._message("thinking " + format_tool_call("price", {"item": "pear"}), u, offer)
    assert parsed.tool_calls[0]["name"] == "price" and parsed.tool_calls[0]["args"] == {"item": "pear"}
    assert parsed.content == "thinking"


def test_device_and_dtype_reach_the_engine():
    model = ChatDeltamem(model="random", device="cpu", dtype="bfloat16", max_tokens=2)
    assert isinstance(model.invoke("hi"), AIMessage)
    engine = model._session.engine
    assert (str(engine.device), str(engine.dtype)) == ("cpu", "torch.bfloat16")
    assert model._identifying_params["dtype"] == "bfloat16"


def test_tool_choice_any_or_named_gives_a_call_the_schema_accepts():
    """A random-weight model never writes a tool call on its own; bound with tool_choice "any" or a tool's name,
    the guide holds it to one, whose arguments jsonschema (an independent validator) accepts."""
    jsonschema = pytest.importorskip("jsonschema")
    paint = {"type": "function", "function": {"name": "paint", "description": "paint", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]}}}  # fmt: skip
    wait = {"type": "function", "function": {"name": "wait", "description": "wait", "parameters": {
        "type": "object", "properties": {"long": {"type": "boolean"}}}}}  # fmt: skip
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (paint, wait)}
    free = ChatDeltamem(model="random", max_tokens=40, temperature=0).bind_tools([paint, wait]).invoke("Paint it.")
    assert not free.tool_calls
    for choice, names in [("any", {"paint", "wait"}), ("wait", {"wait"})]:
        for seed in range(2):
            llm = ChatDeltamem(model="random", max_tokens=40, temperature=1.0, seed=seed)
            msg = llm.bind_tools([paint, wait], tool_choice=choice).invoke("Paint it.")
            (call,) = msg.tool_calls
            assert call["name"] in names
            jsonschema.validate(call["args"], schemas[call["name"]])


def test_response_format_gives_json_the_schema_accepts():
    """bind(response_format=...) in OpenAI's form (as ChatOpenAI takes it): a random-weight model, which left alone
    writes noise, answers with JSON that jsonschema (an independent validator) accepts."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "coats": {"type": "integer",
              "minimum": 1, "maximum": 3}}, "required": ["color", "coats"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "paint", "schema": schema, "strict": True}}
    for seed in range(2):
        llm = ChatDeltamem(model="random", max_tokens=60, temperature=1.0, seed=seed).bind(response_format=fmt)
        jsonschema.validate(json.loads(llm.invoke("Which color, how many coats?").content), schema)
        streamed = "".join(c.content for c in llm.stream("Which color, how many coats?"))  # held to it too
        jsonschema.validate(json.loads(streamed), schema)

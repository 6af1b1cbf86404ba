"""ChatDeltamem against langchain-tests' standard unit tests, and the standard integration tests that a local
random-weight model can pass (invoke, stream, batch, conversation, stop sequences, usage metadata); the ones
that need a model that follows instructions (tool calling, structured output) are switched off by the suite's
own capability flags."""

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from deltamem.agent.chat_model import ChatDeltamem
from deltamem.agent.parse import format_tool_call


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
    rendered = llm._to_dicts([*history, first, call], None)
    assert rendered[-1]["content"] == format_tool_call("price", {"item": "apple"})
    second = llm.invoke([*history, first, HumanMessage("and pear?")])
    u = second.usage_metadata
    assert u["input_token_details"]["cache_read"] == first.usage_metadata["total_tokens"]  # all of call 1
    assert u["input_tokens"] > u["input_token_details"]["cache_read"]
    parsed = llm._message("thinking " + format_tool_call("price", {"item": "pear"}), u, tools=[{}])
    assert parsed.tool_calls[0]["name"] == "price" and parsed.tool_calls[0]["args"] == {"item": "pear"}
    assert parsed.content == "thinking"


def test_device_and_dtype_reach_the_engine():
    model = ChatDeltamem(model="random", device="cpu", dtype="bfloat16", max_tokens=2)
    assert isinstance(model.invoke("hi"), AIMessage)
    engine = model._session.engine
    assert (str(engine.device), str(engine.dtype)) == ("cpu", "torch.bfloat16")
    assert model._identifying_params["dtype"] == "bfloat16"

"""Agent frameworks pointed at a real `deltamem serve` process (the random model, which left alone writes noise):
OpenAI's Agents SDK running a function tool, pydantic-ai with a structured output (its output tool, called as
required), and the `openai` client's structured outputs (`chat.completions.parse`, what instructor's
JSON_SCHEMA mode sends) each get a well-formed result, validated by the framework itself."""

from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from deltamem.server.launch import Served

openai = pytest.importorskip("openai")


class Paint(BaseModel):
    color: Literal["red", "green"]
    coats: int = Field(ge=1, le=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("clients") / "m.db"
    with Served("--model", "random", "--window", "64", "--db", str(db), timeout=180) as s:
        yield s


def test_openai_agents_sdk_runs_a_function_tool(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    painted = []

    @agents.function_tool
    def paint(color: Literal["red", "green"], coats: Annotated[int, Field(ge=1, le=3)]) -> str:
        """Paint the fence."""
        painted.append((color, coats))
        return f"painted {color}"

    client = openai.AsyncOpenAI(base_url=server.url, api_key="-", max_retries=0)
    model = agents.OpenAIChatCompletionsModel(model="random", openai_client=client)
    agent = agents.Agent(name="painter", instructions="Paint the fence.", tools=[paint], model=model,
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=40, temperature=0))
    result = agents.Runner.run_sync(agent, "Paint the fence red.", max_turns=4)  # fmt: skip
    assert painted and painted[0][0] in ("red", "green") and 1 <= painted[0][1] <= 3
    assert isinstance(result.final_output, str)  # the tool's answer went back and the model replied


def test_pydantic_ai_structured_output_through_its_output_tool(server):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    model = OpenAIChatModel("random", provider=OpenAIProvider(base_url=server.url, api_key="-"))
    agent = Agent(model, output_type=Paint, model_settings={"max_tokens": 60, "temperature": 0})
    result = agent.run_sync("How should the fence be painted?", usage_limits=UsageLimits(request_limit=2))
    assert isinstance(result.output, Paint)  # pydantic-ai validated it: a call of its output tool, the first time


def test_openai_structured_outputs_parse(server):
    client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0)
    r = client.chat.completions.parse(model="random", messages=[{"role": "user", "content": "Paint plan?"}],
                                      response_format=Paint, max_tokens=60, temperature=0)  # fmt: skip
    assert isinstance(r.choices[0].message.parsed, Paint)

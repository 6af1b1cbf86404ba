"""The agent loop as a LangGraph StateGraph, checkpointed by LangGraph's own saver in the memory database (SQLite's or
PostgreSQL's: memory/checkpoints.py).

    START -> feed -> END                       (mode "feed": ingested files are read, nothing is generated)
    START -> model -> tools -> model ... -> END (a task: the model answers or calls tools, up to max_steps calls)

The graph's `messages` are the conversation; the model node renders them with the chat template and the brain
(an AgentSession, or a scripted stand-in in unit tests) feeds only what its state has not consumed yet. Risky
tools ask for approval through `interrupt()` under the "ask" policy; all approvals of a step are asked before
any tool of that step runs, so resuming after an interrupt never runs a tool twice.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol, TypedDict

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from deltamem.agent.parse import parse_tool_calls
from deltamem.tools import ToolContext, run_tool

Approve = Literal["never", "ask", "always"]
INVALID_CALL = "(invalid call)"  # the stream's tool name for a call block that could not be parsed


class State(TypedDict, total=False):
    messages: Annotated[list[dict], operator.add]
    steps: int  # model calls in the current run
    mode: str  # "feed" or "" (a task)
    feed_count: int  # in feed mode: how many of the messages at the end are new


class Brain(Protocol):
    def respond(self, messages: list[dict], on_piece: Callable[[str], None]) -> str: ...

    def feed_messages(self, messages: list[dict], new_count: int, on_progress: Callable[[dict], None]) -> int: ...


def build_graph(
    brain: Brain,
    tools: dict,
    ctx: ToolContext,
    approve: Approve = "never",
    max_steps: int = 8,
    checkpointer: BaseCheckpointSaver | None = None,
    should_stop: Callable[[], bool] = lambda: False,
):
    if approve not in ("never", "ask", "always"):
        raise ValueError(f"approval policy must be never, ask or always; got {approve!r}")
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")

    schemas = {t.name: t.parameters for t in tools.values()}

    def feed(state: State) -> dict:
        writer = get_stream_writer()
        brain.feed_messages(state["messages"], state.get("feed_count", 0), lambda e: writer({"progress": e}))
        return {"mode": "", "feed_count": 0}

    def model(state: State) -> dict:
        writer = get_stream_writer()
        steps = state.get("steps", 0) + 1
        text = brain.respond(state["messages"], lambda piece: writer({"token": piece}))
        parsed = parse_tool_calls(text, id_prefix=f"s{steps}", schemas=schemas)
        msg = {"role": "assistant", "content": text, "tool_calls": parsed.calls, "errors": parsed.errors}
        return {"messages": [msg], "steps": steps}

    def route_start(state: State) -> str:
        return "feed" if state.get("mode") == "feed" else "model"

    def route_model(state: State) -> str:
        last = state["messages"][-1]
        if not (last["tool_calls"] or last["errors"]) or state["steps"] >= max_steps or should_stop():
            return END
        return "tools"

    def run_tools(state: State) -> dict:
        writer = get_stream_writer()
        last = state["messages"][-1]
        approved = {}
        for call in last["tool_calls"]:  # every question first: a resumed node re-runs from its start
            tool = tools.get(call["name"])
            if tool is not None and tool.risky:
                if approve == "ask":
                    approved[call["id"]] = bool(interrupt({"tool": call["name"], "arguments": call["arguments"]}))
                else:
                    approved[call["id"]] = approve == "always"
        out = []
        for e in last["errors"]:  # a malformed call block: its error goes back to the model, and to the stream
            writer({"tool": INVALID_CALL, "arguments": {}, "ok": False, "result": f"error: {e}"})
            out.append({"role": "tool", "content": f"error: {e}", "ok": False})
        for call in last["tool_calls"]:
            if approved.get(call["id"], True):
                ok, result = run_tool(ctx, tools, call["name"], call["arguments"])
            else:
                why = "the user declined" if approve == "ask" else "risky tools are off (--approve never)"
                ok, result = False, f"error: {call['name']} was not run: {why}"
            writer({"tool": call["name"], "arguments": call["arguments"], "ok": ok, "result": result})
            out.append({"role": "tool", "content": f"[{call['name']}] {result}", "ok": ok, "call": call})
        return {"messages": out}

    g = StateGraph(State)
    g.add_node("feed", feed)
    g.add_node("model", model)
    g.add_node("tools", run_tools)
    g.add_conditional_edges(START, route_start, ["feed", "model"])
    g.add_edge("feed", END)
    g.add_conditional_edges("model", route_model, ["tools", END])
    g.add_edge("tools", "model")
    return g.compile(checkpointer=checkpointer)


def outcome(state: dict[str, Any]) -> str:
    """ "answer" when the last message is an assistant turn without tool calls, else "step_limit"."""
    msgs = state.get("messages") or []
    last = msgs[-1] if msgs else {}
    if last.get("role") == "assistant" and not (last.get("tool_calls") or last.get("errors")):
        return "answer"
    return "step_limit"

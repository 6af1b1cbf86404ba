"""The LangGraph loop with a deterministic scripted brain (the only place a stand-in model is used): routing,
tool results, the step limit, malformed calls, approval interrupts, and checkpoints in a real SQLite file."""

import pytest
from langgraph.types import Command

from deltamem.agent.graph import INVALID_CALL, build_graph, outcome
from deltamem.agent.parse import format_tool_call
from deltamem.memory.checkpoints import open_saver
from deltamem.tools import ToolContext, default_tools


class Scripted:
    """Answers with the next scripted text; records what it was shown."""

    def __init__(self, *texts):
        self.texts = list(texts)
        self.seen = []

    def respond(self, messages, on_piece):
        self.seen.append([m["content"] for m in messages])
        text = self.texts.pop(0) if self.texts else "done"
        for i in range(0, len(text), 7):
            on_piece(text[i : i + 7])
        return text

    def feed_messages(self, messages, new_count, on_progress):
        for i in range(new_count):
            on_progress({"done": i + 1, "count": new_count, "tokens": 1})
        return new_count


@pytest.fixture()
def project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "README.md").write_text("line one\nthe answer is 42\n")
    return root


def drive(graph, inp, config, answers=()):
    """Run to the end; answer interrupts from `answers`; return the streamed custom events."""
    answers = list(answers)
    events = []
    while True:
        pending = None
        for mode, chunk in graph.stream(inp, config, stream_mode=["custom", "updates"]):
            if mode == "custom":
                events.append(chunk)
            elif "__interrupt__" in chunk:
                pending = chunk["__interrupt__"][0].value
        if pending is None:
            return events
        events.append({"interrupt": pending})
        inp = Command(resume=answers.pop(0))


def task(text):
    return {"messages": [{"role": "user", "content": text}], "steps": 0, "mode": ""}


def test_tool_call_then_answer(project, tmp_path):
    brain = Scripted("Let me look." + format_tool_call("read_file", {"path": "README.md"}), "It is 42.")
    saver = open_saver(str(tmp_path / "m.db"))
    graph = build_graph(brain, default_tools(), ToolContext(root=project), checkpointer=saver)
    config = {"configurable": {"thread_id": "t1"}}
    events = drive(graph, task("what is the answer?"), config)
    state = graph.get_state(config).values
    assert outcome(state) == "answer" and state["steps"] == 2
    assert [m["role"] for m in state["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert "the answer is 42" in state["messages"][2]["content"]  # the real file, read by the real tool
    assert "the answer is 42" in brain.seen[1][-1]  # and shown to the model on its next call
    assert "".join(e["token"] for e in events if "token" in e) == "".join(
        m["content"] for m in state["messages"] if m["role"] == "assistant"
    )
    # the checkpoint is in the SQLite file: a fresh graph on a fresh connection sees the conversation
    again = build_graph(
        Scripted(), default_tools(), ToolContext(root=project), checkpointer=open_saver(str(tmp_path / "m.db"))
    )
    assert again.get_state(config).values["messages"] == state["messages"]


def test_step_limit_and_malformed_calls(project):
    looping = format_tool_call("list_dir", {"path": "."})
    brain = Scripted("<tool_call>{not json</tool_call>", looping, looping, looping, looping)
    graph = build_graph(
        brain,
        default_tools(),
        ToolContext(root=project),
        max_steps=3,
        checkpointer=open_saver(str(project.parent / "c.db")),
    )
    config = {"configurable": {"thread_id": "t2"}}
    events = drive(graph, task("loop"), config)
    state = graph.get_state(config).values
    assert state["steps"] == 3 and outcome(state) == "step_limit"
    assert state["messages"][2]["content"].startswith("error: a tool call is not valid JSON")  # told, not crashed
    calls = [e for e in events if "tool" in e]  # the stream shows the malformed call too, as a failed one
    assert [(e["tool"], e["ok"]) for e in calls] == [(INVALID_CALL, False), ("list_dir", True)]
    assert "README.md" in state["messages"][4]["content"]


@pytest.mark.parametrize(
    "policy, answers, written",
    [("never", [], False), ("always", [], True), ("ask", [True], True), ("ask", [False], False)],
)
def test_risky_tools_follow_the_approval_policy(project, policy, answers, written):
    write = format_tool_call("write_file", {"path": "out.txt", "content": "hello"})
    read = format_tool_call("read_file", {"path": "README.md"})
    brain = Scripted(read + write, "finished")
    graph = build_graph(
        brain,
        default_tools(),
        ToolContext(root=project),
        approve=policy,
        checkpointer=open_saver(str(project.parent / f"{policy}{answers}.db")),
    )
    config = {"configurable": {"thread_id": "t3"}}
    events = drive(graph, task("write it"), config, answers)
    assert (project / "out.txt").exists() == written
    if written:
        assert (project / "out.txt").read_text() == "hello"
    asked = [e["interrupt"] for e in events if "interrupt" in e]
    assert asked == (
        [{"tool": "write_file", "arguments": {"path": "out.txt", "content": "hello"}}] if policy == "ask" else []
    )
    runs = [e["tool"] for e in events if "tool" in e]
    assert runs == ["read_file", "write_file"]  # the read ran once, even across the interrupt
    state = graph.get_state(config).values
    assert outcome(state) == "answer"


def test_feed_mode_generates_nothing(project):
    brain = Scripted()
    graph = build_graph(
        brain, default_tools(), ToolContext(root=project), checkpointer=open_saver(str(project.parent / "f.db"))
    )
    config = {"configurable": {"thread_id": "t4"}}
    msgs = [{"role": "user", "content": "File a:\nx"}, {"role": "user", "content": "File b:\ny"}]
    events = drive(graph, {"messages": msgs, "mode": "feed", "feed_count": 2}, config)
    assert [e["progress"]["done"] for e in events] == [1, 2] and brain.seen == []
    assert graph.get_state(config).values["messages"] == msgs


def test_tool_call_in_qwen35_native_syntax_round_trips(project, tmp_path):
    """A Qwen3.5 model answers in its trained XML form (an integer parameter among them); the graph parses it with the
    tools' schemas, the real tool runs, and the result goes back through Qwen3.5's real template as <tool_response>."""
    from pathlib import Path

    from deltamem.agent.prompt import ChatTemplate, tool_specs

    template = ChatTemplate((Path(__file__).parent / "templates" / "qwen3_5.jinja").read_text())
    template.tools = tool_specs(default_tools())
    call = format_tool_call("read_file", {"path": "README.md", "start_line": 2}, template.call_syntax)
    assert call.startswith("<tool_call>\n<function=read_file>\n<parameter=path>\nREADME.md\n</parameter>")
    brain = Scripted("<think>\nthe README says\n</think>\n\n" + call, "It is 42.")
    graph = build_graph(
        brain, default_tools(), ToolContext(root=project), checkpointer=open_saver(str(tmp_path / "q.db"))
    )
    config = {"configurable": {"thread_id": "q"}}
    drive(graph, task("what is the answer?"), config)
    state = graph.get_state(config).values
    assert state["messages"][1]["tool_calls"][0]["arguments"] == {"path": "README.md", "start_line": 2}
    assert state["messages"][2]["ok"] and "the answer is 42" in state["messages"][2]["content"]
    assert "line one" not in state["messages"][2]["content"]  # start_line arrived as the integer 2
    prompt = template.render(state["messages"][:3])
    assert "<|im_start|>user\n<tool_response>\n[read_file]" in prompt and "the answer is 42" in prompt
    assert prompt.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")

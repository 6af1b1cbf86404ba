"""The Textual app driven by its Pilot, with the real default model and a real memory database: open, resume,
send a message and see streamed text, cancel generation, rewind, fork, delete, ingest, help."""

import subprocess

import pytest

from deltamem.agent.runner import Agent
from deltamem.memory.store import Store
from deltamem.model import load_model
from deltamem.model.options import ModelOptions
from deltamem.ui.app import DeltamemApp
from deltamem.ui.sessions import SessionsScreen
from deltamem.ui.widgets import AssistantMessage, ConfirmScreen, HelpScreen, UserMessage

SIZE = (120, 40)


@pytest.fixture()
def repo(tmp_path):
    r = tmp_path / "shop"
    r.mkdir()
    (r / "README.md").write_text("# Shop\nPrices live in prices.py.\n")
    (r / "prices.py").write_text("PRICES = {'apple': 3}\n")
    subprocess.run(["git", "init", "-q"], cwd=r, check=True)
    return r


async def settle(app, pilot, timeout=120.0):
    """Wait until the app's agent work is done (model load, a run, an ingest)."""
    for _ in range(int(timeout * 10)):
        await pilot.pause(0.1)
        if app.agent is not None and not app.busy and not app.workers._workers:
            return
    raise AssertionError("the app stayed busy")


async def first_tokens(app, pilot):
    """Wait until the answer being generated has shown some text."""
    for _ in range(600):
        await pilot.pause(0.05)
        if app.query(AssistantMessage) and app.query(AssistantMessage).first().source:
            return
    raise AssertionError("no answer text appeared")


async def test_send_a_message_and_see_it_streamed_and_saved(repo, tmp_path):
    app = DeltamemApp(tmp_path / "m.db", repo, max_new_tokens=12)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press(*"hello", "enter")
        await settle(app, pilot)
        users = [w.source if hasattr(w, "source") else str(w.render()) for w in app.query(UserMessage)]
        answers = list(app.query(AssistantMessage))
        assert "hello" in users[0] and answers and answers[0].source.strip()
        sid = app.agent.session_id
        with Store(tmp_path / "m.db") as store:
            turns = store.turns(sid)
            assert [t["role"] for t in turns][1:3] == ["user", "assistant"]
            assert turns[2]["text"] == answers[0].source  # what was streamed is what was saved
            assert store.load_snapshot(sid) == app.agent.session.engine.snapshot()


async def test_compiled_decode_is_ready_when_the_model_is(repo, tmp_path):
    """With --compile (the CLI's default) the loader prepares the compiled step before the first reply."""
    app = DeltamemApp(tmp_path / "m.db", repo, options=ModelOptions(quant="auto", compile=True), max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot, timeout=300)
        engine = app.agent.session.engine
        assert engine.compile_decode and engine._graph is not None and engine._graph.compiled
        await pilot.press(*"hello", "enter")
        await settle(app, pilot)
        assert app.query(AssistantMessage).first().source.strip()


async def test_resume_shows_the_conversation_and_the_state(repo, tmp_path):
    with Store(tmp_path / "m.db") as store:
        agent = Agent(load_model("default"), store, "shop", repo, max_new_tokens=5, retrieve=False)
        agent.run("what costs 3?")
        seen = agent.session.engine.tokens_seen
    app = DeltamemApp(tmp_path / "m.db", repo, session="shop")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert str(app.query(UserMessage).first().render()) == "what costs 3?"
        assert app.agent.session.engine.tokens_seen == seen
        assert f"{seen:,}" in str(app.query_one("#mem-stats").render())
        assert app.query_one("#snapshots").row_count == 1


async def test_escape_stops_generation_and_the_state_stays_consistent(repo, tmp_path):
    app = DeltamemApp(tmp_path / "m.db", repo, max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press(*"tell me a long story", "enter")
        await first_tokens(app, pilot)
        await pilot.press("escape")
        await settle(app, pilot)
        gen = len(app.agent.session.engine.generated)
        assert 0 < gen < 400  # stopped early
        with Store(tmp_path / "m.db") as store:  # the partial answer was committed with its exact state
            assert store.load_snapshot(app.agent.session_id) == app.agent.session.engine.snapshot()
            ids = store.load_tokens(app.agent.session_id, store.snapshots(app.agent.session_id)[-1]["id"])
            assert ids == app.agent.session.ids


async def test_rewind_and_fork_from_the_memory_panel(repo, tmp_path):
    with Store(tmp_path / "m.db") as store:
        agent = Agent(load_model("default"), store, "shop", repo, max_new_tokens=3, retrieve=False)
        agent.run("first")
        agent.run("second")
        first_turn = store.snapshots("shop")[0]["turn_seq"]
    app = DeltamemApp(tmp_path / "m.db", repo, session="shop")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert len(app.query(UserMessage)) == 2
        table = app.query_one("#snapshots")
        table.focus()
        await pilot.press("down", "r")  # rows are newest first: the second row is the first turn
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(app, pilot)
        assert [str(w.render()) for w in app.query(UserMessage)] == ["first"]
        assert [s["turn_seq"] for s in app.store.snapshots("shop")] == [first_turn]
        app.query_one("#snapshots").focus()
        await pilot.press("f")
        await settle(app, pilot)
        assert app.store.session(app.agent.session_id)["title"] == "shop (fork)"
        assert [str(w.render()) for w in app.query(UserMessage)] == ["first"]


async def test_session_browser_filter_resume_and_delete(repo, tmp_path):
    with Store(tmp_path / "m.db") as store:
        for title in ("alpha", "beta"):
            Agent(load_model("default"), store, title, repo, max_new_tokens=2).run(f"hi {title}")
    app = DeltamemApp(tmp_path / "m.db", repo, session="alpha")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press(*"bet")
        table = app.screen.query_one("#session-table")
        assert table.row_count == 1
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.store.session(app.agent.session_id)["title"] == "beta"
        await pilot.press("ctrl+o", *"alpha", "ctrl+d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause(0.2)
        assert [s["title"] for s in app.store.sessions()] == ["beta"]


async def test_ingest_with_progress_then_help(repo, tmp_path):
    app = DeltamemApp(tmp_path / "m.db", repo)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert "ingested 2 files" in str(app.query_one("#ingest-status").render())
        assert set(app.store.ingested(app.agent.session_id)) == {"README.md", "prices.py", "<repository map>"}
        assert "2 files read" in " ".join(str(w.render()) for w in app.query(".files"))
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_narrow_terminal_hides_the_memory_panel(repo, tmp_path):
    app = DeltamemApp(tmp_path / "m.db", repo)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert not app.query_one("#memory").display
        await pilot.press("f2")
        assert app.query_one("#memory").display


class ScriptedBrain:
    """Stands in for the model in the approval test only: the random default model never writes a tool call."""

    def __init__(self, *texts):
        self.texts = list(texts)

    def respond(self, messages, on_piece):
        text = self.texts.pop(0) if self.texts else "done"
        on_piece(text)
        return text

    def feed_messages(self, messages, new_count, on_progress):
        return 0


@pytest.mark.parametrize("answer, written", [("y", True), ("n", False)])
async def test_a_risky_tool_call_asks_and_follows_the_answer(repo, tmp_path, answer, written):
    from deltamem.agent.graph import build_graph
    from deltamem.agent.parse import format_tool_call

    def factory(store, name):
        agent = Agent(load_model("default"), store, name, repo, approve="ask", retrieve=False)
        brain = ScriptedBrain(format_tool_call("write_file", {"path": "notes.txt", "content": "hi"}), "ok")
        agent.graph = build_graph(brain, agent.tools, agent.ctx, "ask", 4, agent.saver)
        return agent

    app = DeltamemApp(tmp_path / "m.db", repo, agent_factory=factory)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press(*"write it", "enter")
        for _ in range(100):
            await pilot.pause(0.05)
            if isinstance(app.screen, ConfirmScreen):
                break
        assert isinstance(app.screen, ConfirmScreen) and "write_file" in str(app.screen.query_one("#question").render())
        await pilot.press(answer)
        await settle(app, pilot)
        assert (repo / "notes.txt").exists() == written
        panels = list(app.query(".tool"))
        assert len(panels) == 1 and panels[0].title.startswith("✓" if written else "✗")


async def test_rename_export_history_and_multiline(repo, tmp_path):
    app = DeltamemApp(tmp_path / "m.db", repo, max_new_tokens=2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press(*"line one", "ctrl+j", *"line two", "enter")
        await settle(app, pilot)
        assert app.store.turns(app.agent.session_id)[1]["text"] == "line one\nline two"
        await pilot.press("up")  # the input history brings the last message back
        assert app.query_one("#prompt").text == "line one\nline two"
        await pilot.press("ctrl+o", "ctrl+n")
        await pilot.press(*["backspace"] * 10, *"renamed", "enter")
        await pilot.pause(0.2)
        assert app.store.session(app.agent.session_id)["title"] == "renamed"
        await pilot.press("ctrl+e", *["backspace"] * 30, *str(tmp_path / "out.dmsession"), "enter")
        await pilot.pause(0.5)
        assert (tmp_path / "out.dmsession").stat().st_size > 0
    with Store(tmp_path / "other.db") as other:  # the export is a valid session file
        assert other.import_(tmp_path / "out.dmsession") == app.agent.session_id


async def test_cancelled_ingest_keeps_the_ledger_consistent(repo, tmp_path):
    for i in range(6):
        (repo / f"doc{i}.md").write_text(f"document {i}\n" + "words " * 3000)
    app = DeltamemApp(tmp_path / "m.db", repo)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        before = app.agent.session.engine.snapshot()
        await pilot.press("ctrl+r")
        for _ in range(600):  # stop once the first file has been fed
            await pilot.pause(0.05)
            if "tokens" in str(app.query_one("#ingest-status").render()):
                break
        await pilot.press("escape")
        await settle(app, pilot)
        assert "cancelled" in str(app.query_one("#ingest-status").render())
        sid = app.agent.session_id
        ledger = app.store.ingested(sid)
        snaps = app.store.snapshots(sid)
        # whatever was committed is complete: the ledger matches the state it was saved with, nothing more
        if snaps:
            assert app.agent.session.engine.snapshot() == app.store.load_snapshot(sid)
        else:
            assert ledger == {} and app.agent.session.engine.snapshot() == before
        assert len(ledger) < 8


async def test_quitting_mid_answer_saves_the_turn(repo, tmp_path):
    app = DeltamemApp(tmp_path / "m.db", repo, max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press(*"go on", "enter")
        await first_tokens(app, pilot)
        await pilot.press("ctrl+q")
    with Store(tmp_path / "m.db") as store:
        turns = store.turns(app.agent.session_id)
        assert [t["role"] for t in turns][-2:] == ["user", "assistant"] and turns[-2]["text"] == "go on"


async def test_failed_ingest_goes_back_to_the_last_save(repo, tmp_path):
    """An ingest that fails half-way (here the engine raises after feeding a file) leaves the session as a failed
    chat does: state, conversation and ledger at the last committed turn."""

    def agent_factory(store, name):
        agent = Agent(load_model("random", window=64), store, name, repo, max_new_tokens=2, retrieve=False)
        engine, real = agent.session.engine, agent.session.engine.feed

        def feed(ids, **kw):
            out = real(ids, **kw)
            if armed:
                armed.pop()
                if not armed:  # one file fed, then the second file's tokens
                    raise RuntimeError("the disk is on fire")
            return out

        engine.feed = feed
        return agent

    armed = []

    app = DeltamemApp(tmp_path / "m.db", repo, agent_factory=agent_factory)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press(*"hello", "enter")  # one committed turn to go back to
        await settle(app, pilot)
        sid = app.agent.session_id
        saved, messages = app.store.load_snapshot(sid), app.agent.messages()
        armed.extend([1, 2])
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert "ingest failed: the disk is on fire; back to the last save" in str(
            app.query_one("#ingest-status").render()
        )
        assert app.agent.session.engine.snapshot() == saved
        assert app.agent.messages() == messages and app.store.ingested(sid) == {}


async def test_sink_and_window_reach_the_engine(repo, tmp_path):
    app = DeltamemApp(tmp_path / "m.db", repo, options=ModelOptions("random", window=64, sink=2))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        engine = app.agent.session.engine
        assert (engine.sink, engine.window) == (2, 64)
        assert "2 sink + 64" in str(app.query_one("#mem-stats").render())


async def test_an_ambiguous_session_is_shown_not_a_crash(repo, tmp_path):
    with Store(tmp_path / "m.db") as store:
        project = store.project(repo)
        ids = [store.create_session("shop", "fp", project) for _ in range(2)]
    app = DeltamemApp(tmp_path / "m.db", repo, options=ModelOptions("random", window=64))
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(600):
            await pilot.pause(0.05)
            status = str(app.query_one("#status").render())
            if "cannot open" in status:
                break
        assert "'shop' matches 2 sessions" in status and all(i in status for i in ids)
        assert app.agent is None and app.is_running

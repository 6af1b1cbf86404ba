"""The deltamem terminal UI (Textual): chat with streaming answers, tool panels and approvals, the memory panel,
ingest with progress, and the session browser.

All model work runs in thread workers (the engine and the store are synchronous); the UI thread only renders.
Every finished turn is already committed to the memory store, so quitting never loses one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static

from deltamem.model.options import ModelOptions
from deltamem.ui.format import size
from deltamem.ui.widgets import (
    AskScreen,
    AssistantMessage,
    ChatLog,
    ConfirmScreen,
    HelpScreen,
    MemoryPanel,
    Prompt,
    UserMessage,
    tool_panel,
)


class DeltamemApp(App):
    CSS_PATH = "deltamem.tcss"
    TITLE = "deltamem"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+o", "sessions", "Sessions"),
        Binding("ctrl+r", "ingest", "Ingest"),
        Binding("f1", "help", "Help"),
        Binding("f2", "toggle_memory", "Memory panel"),
    ]

    def __init__(
        self,
        db: Path | None,
        repo: Path,
        session: str | None = None,
        options: ModelOptions | None = None,
        max_new_tokens: int = 256,
        agent_factory=None,
        convert_state: bool = False,
        tools: bool = True,
    ):
        super().__init__()
        self.tools = tools  # False: no tool offered, the model answers from its memory alone
        self.db, self.repo = db, Path(repo).resolve()
        self.options = options or ModelOptions()  # which model, loaded at the first session
        self.session_name = session or self.repo.name
        self.max_new_tokens, self.convert_state = max_new_tokens, convert_state
        self.agent_factory = agent_factory  # tests: (store, session name) -> Agent; default builds the real one
        self.agent = None
        self.store = None  # read by the UI thread
        self.agent_store = None  # used by the agent's worker threads, one at a time
        self.engine = None
        self.loading_model = False
        self.busy = False
        self.last_save: float | None = None
        self._stream_target: AssistantMessage | None = None

    # --- layout --------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat-pane"):
                yield ChatLog(id="chat")
                yield Static("", id="status")
                yield Prompt(id="prompt")
            yield MemoryPanel(id="memory")
        yield Footer()

    def on_mount(self) -> None:
        from deltamem.memory.store import Store

        self.store = Store(self.db)
        self.query_one("#status", Static).update("loading the model…")
        self.query_one(Prompt).focus()
        self._open(self.session_name)

    # --- opening sessions ------------------------------------------------------------------------------------
    def _load_model(self):
        """Load in a daemon thread this worker only watches, so that quitting meanwhile is not held up by it (Textual
        waits for its workers; cli/tui.py leaves without waiting for this thread). None if the app quits first."""
        import threading

        from textual.worker import get_current_worker

        box: dict = {}

        def load() -> None:
            try:
                eng = self.options.load()
                if eng.compile_decode:  # the compiled step: loaded from the cache, or compiled once, before replies
                    status = "preparing the decode step…"
                    self.call_from_thread(lambda: self.query_one("#status", Static).update(status))
                    eng.prepare_decode()
                box["engine"] = eng
            except BaseException as e:  # handed to the worker, which reports it
                box["error"] = e

        self.loading_model = True
        thread = threading.Thread(target=load, name="deltamem-load", daemon=True)
        thread.start()
        worker = get_current_worker()
        while thread.is_alive():
            thread.join(0.05)
            if worker.is_cancelled:
                return None
        self.loading_model = False
        if "error" in box:
            raise box["error"]
        return box["engine"]

    @work(thread=True, exclusive=True, group="agent")
    def _open(self, name: str, repo: Path | None = None) -> None:
        """Open (or create) a session in `repo` (default: the current folder), which becomes current if it opens."""
        from deltamem.memory.store import Store

        root = repo or self.repo

        if self.agent_store is None:  # the agent's own connection; the UI thread reads through self.store
            self.agent_store = Store(self.db)
        store = self.agent_store
        try:
            if self.agent_factory is not None:
                agent = self.agent_factory(store, name)
            else:
                from deltamem.agent.runner import Agent

                if self.engine is None:
                    self.engine = self._load_model()
                    if self.engine is None:  # the app is quitting
                        return
                else:  # the loaded weights, a fresh state for the other session
                    self.engine = self.engine.sibling()
                agent = Agent(
                    self.engine,
                    store,
                    name,
                    root,
                    approve="ask",
                    max_new_tokens=self.max_new_tokens,
                    convert_state=self.convert_state,
                    tools=self.tools,
                )
        except Exception as e:  # an ambiguous title, another project's session, a model that does not load: shown
            self.call_from_thread(self._open_failed, f"cannot open session {name!r}: {e}")
            return
        old, self.agent, self.repo = self.agent, agent, root
        if old is not None and old is not agent and hasattr(old, "close"):
            old.close()  # its saver's connection
        self.call_from_thread(self._show_session)

    def _open_failed(self, message: str) -> None:
        self.query_one("#status", Static).update(message)
        self.notify(message, severity="error", timeout=30)

    def _show_session(self) -> None:
        chat = self.query_one(ChatLog)
        chat.remove_children()
        files = 0
        for m in self.agent.messages():
            if m["role"] == "system":
                continue
            if m["role"] == "user" and m["content"].startswith("File "):
                files += 1
                continue
            if files:
                chat.mount(Static(f"📄 {files} files read", classes="files"))
                files = 0
            if m["role"] == "user":
                chat.mount(UserMessage(m["content"], markup=False))
            elif m["role"] == "assistant":
                chat.mount(AssistantMessage(m["content"]))
            elif m["role"] == "tool" and "call" in m:
                c = m["call"]
                chat.mount(
                    tool_panel(
                        {
                            "tool": c["name"],
                            "arguments": c["arguments"],
                            "ok": m.get("ok", True),
                            "result": m["content"],
                        }
                    )
                )
        if files:
            chat.mount(Static(f"📄 {files} files read", classes="files"))
        if not chat.children:
            chat.mount(
                Static(
                    f"New session for {self.repo.name}. Press Ctrl+R to read the project's files into "
                    "memory, then ask about them. F1 shows every key.",
                    classes="files",
                )
            )
        chat.scroll_end(animate=False)
        title = self.store.session(self.agent.session_id)["title"]
        self.sub_title = f"{title} · {self.repo.name}"
        self.query_one("#status", Static).update("")
        self.refresh_memory()

    # --- memory panel ----------------------------------------------------------------------------------------
    def refresh_memory(self) -> None:
        if self.agent is None:
            return
        eng = self.agent.session.engine
        sizes = eng.state_sizes()
        recurrent, kv = sizes["recurrent"], sizes["kv"]
        cap = None if eng.window is None else eng.sink + eng.window
        saved = "never" if self.last_save is None else f"{time.time() - self.last_save:.0f} s ago"
        self.query_one("#mem-stats", Static).update(
            f"tokens seen  {eng.tokens_seen:,}\nrecurrent    {size(recurrent)}\nKV cache     {size(kv)}\n"
            f"window       {'full attention' if cap is None else f'{eng.sink} sink + {eng.window}'}\n"
            f"last save    {saved}"
        )
        bar = self.query_one("#window-fill", ProgressBar)
        bar.update(total=cap or max(eng.tokens_seen, 1), progress=min(eng.tokens_seen, cap or eng.tokens_seen))
        table = self.query_one("#snapshots", DataTable)
        table.clear()
        for s in reversed(self.store.snapshots(self.agent.session_id)):
            table.add_row(
                str(s["turn_seq"]),
                f"{s['tokens_seen']:,}",
                size(s["bytes"]),
                s["created"][11:19],
                key=str(s["turn_seq"]),
            )

    # --- chat ------------------------------------------------------------------------------------------------
    @on(Prompt.Submitted)
    def send(self, event: Prompt.Submitted) -> None:
        if self.agent is None or self.busy:
            self.notify("wait for the current answer (Esc stops it)", severity="warning")
            return
        chat = self.query_one(ChatLog)
        chat.mount(UserMessage(event.text, markup=False))
        self._stream_target = None
        self.busy = True
        self.query_one("#status", Static).update("thinking… (Esc to stop)")
        self._run(event.text)

    async def _token(self, piece: str) -> None:
        if self._stream_target is None:  # the first piece of an answer (or of one after a tool call)
            self._stream_target = AssistantMessage("")
            await self.query_one(ChatLog).mount(self._stream_target)
        await self._stream_target.append(piece)
        self.query_one(ChatLog).scroll_end(animate=False)

    def _tool(self, event: dict) -> None:
        self.query_one(ChatLog).mount(tool_panel(event))
        self._stream_target = None

    def _approve(self, pending: dict) -> bool:
        """Called in the worker thread: ask on the UI thread, wait for the answer."""
        answer: dict = {}
        done = threading.Event()

        def ask() -> None:
            import json

            args = json.dumps(pending["arguments"], ensure_ascii=False, indent=1)
            self.push_screen(
                ConfirmScreen(f"Run {pending['tool']}?", args[:2000]),
                callback=lambda ok: (answer.update(ok=ok), done.set()),
            )

        self.call_from_thread(ask)
        done.wait()
        return bool(answer.get("ok"))

    @work(thread=True, exclusive=True, group="agent")
    def _run(self, text: str) -> None:
        def on_event(e: dict) -> None:
            if "token" in e:
                self.call_from_thread(self._token, e["token"])
            elif "tool" in e:
                self.call_from_thread(self._tool, e)

        try:
            result = self.agent.run(text, on_event, self._approve)
            self.last_save = time.time()
            note = (
                "stopped"
                if self.agent.session.cancel.is_set()
                else ("" if result.outcome == "answer" else "stopped at the step limit")
            )
        except Exception as e:  # shown, never a crash: the session stays at its last saved turn
            self.agent.back_to_last_save()
            note = f"error: {e}"
        self.call_from_thread(self._done, note)

    def _done(self, note: str) -> None:
        self.busy = False
        self.query_one("#status", Static).update(note)
        self.refresh_memory()

    def action_stop(self) -> None:
        if self.agent is not None and self.busy:
            self.agent.session.cancel.set()

    # --- ingest ----------------------------------------------------------------------------------------------
    def action_ingest(self) -> None:
        if self.agent is None or self.busy:
            self.notify("busy: wait or press Esc", severity="warning")
            return
        self.busy = True
        self.query_one("#ingest-bar", ProgressBar).remove_class("hidden")
        self._ingest()

    @work(thread=True, exclusive=True, group="agent")
    def _ingest(self) -> None:
        status = self.query_one("#ingest-status", Static)
        bar = self.query_one("#ingest-bar", ProgressBar)
        tokens = [0]
        start = time.perf_counter()

        def on_event(e: dict) -> None:
            if "scan" in e:
                self.call_from_thread(bar.update, total=max(e["scan"]["changed"], 1), progress=0)
            elif "file" in e:
                tokens[0] += e["tokens"]
                rate = tokens[0] / max(time.perf_counter() - start, 1e-9)
                self.call_from_thread(bar.advance, 1)
                self.call_from_thread(status.update, f"{e['file'][-30:]}\n{tokens[0]:,} tokens · {rate:,.0f} tok/s")

        try:
            r = self.agent.ingest(on_event)
            note = (
                f"ingest cancelled; kept {r.files} files"
                if r.cancelled
                else f"ingested {r.files} files ({r.tokens:,} tokens), {r.unchanged} unchanged"
            )
            self.last_save = time.time()
        except Exception as e:  # as a failed chat does: the state and the conversation go back to the last save
            note = f"ingest failed: {e}; back to the last save"
            try:
                self.agent.back_to_last_save()
            except Exception as again:  # still leave the busy state: the note says what is wrong
                note = f"ingest failed: {e}; going back to the last save failed too: {again}"
        self.call_from_thread(self._ingested, note)

    def _ingested(self, note: str) -> None:
        self.busy = False
        self.query_one("#ingest-bar", ProgressBar).add_class("hidden")
        self.query_one("#ingest-status", Static).update(note)
        self._show_session()

    # --- snapshots: rewind and fork ------------------------------------------------------------------------------
    def _selected_turn(self) -> int | None:
        table = self.query_one("#snapshots", DataTable)
        if table.row_count == 0:
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def on_key(self, event) -> None:
        if self.focused is not self.query_one("#snapshots", DataTable) or event.key not in ("r", "f"):
            return
        turn = self._selected_turn()
        if turn is None or self.busy:
            return
        event.stop()
        if event.key == "r":
            self.rewind(turn)
        else:
            self.fork(turn)

    def rewind(self, turn: int) -> None:
        def go(ok: bool) -> None:
            if ok:
                from deltamem.agent import threads

                threads.rewind(self.store, self.agent.session_id, turn)
                self._open(self.agent.session_id)

        self.push_screen(ConfirmScreen(f"Rewind to turn {turn}?", "Everything after it is dropped."), go)

    def fork(self, turn: int | None = None, source: str | None = None) -> None:
        from deltamem.agent import threads

        new = threads.fork(self.store, source or self.agent.session_id, at_turn=turn)
        self.notify(f"forked into {self.store.session(new)['title']}")
        self._open(new)

    # --- sessions ------------------------------------------------------------------------------------------------
    def action_sessions(self) -> None:
        from deltamem.ui.sessions import SessionsScreen

        if self.store is not None and not self.busy:
            project = self.store.project(self.repo)
            self.push_screen(SessionsScreen(self.store, project, self.agent.session_id if self.agent else None))

    def resume(self, sid: str) -> None:
        """Open a session of the browser's: one of another project with that project's folder, or, where that
        folder is not on this machine (an imported session), with this one."""
        sess = self.store.session(sid)
        root = None
        if sess["project_id"] is not None:
            root = Path(self.store.db["projects"].get(sess["project_id"])["root"])
        self._open(sid, root if root is not None and root.is_dir() else None)

    def rename(self, sid: str) -> None:
        def go(title: str | None) -> None:
            if title:
                self.store.rename(sid, title)
                if self.agent and sid == self.agent.session_id:
                    self.sub_title = f"{title} · {self.repo.name}"

        self.push_screen(AskScreen("New title", self.store.session(sid)["title"]), go)

    def on_resize(self, event) -> None:
        self.query_one(MemoryPanel).display = event.size.width >= 90  # 80 columns: the chat gets the width

    def action_toggle_memory(self) -> None:
        panel = self.query_one(MemoryPanel)
        panel.display = not panel.display

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Sessions", "Browse, resume, fork, rename, delete, export sessions", self.action_sessions)
        yield SystemCommand("Ingest project", "Read new and changed files into memory", self.action_ingest)
        yield SystemCommand("Fork session", "A new session from the latest snapshot", lambda: self.fork())
        yield SystemCommand(
            "Rename session",
            "Give this session a new title",
            lambda: self.rename(self.agent.session_id) if self.agent else None,
        )
        yield SystemCommand("Help", "Keys and what they do", self.action_help)

    async def action_quit(self) -> None:
        if self.agent is not None and self.busy:  # stop generating: the run commits its turn, then we leave
            self.agent.session.cancel.set()
            self.query_one("#status", Static).update("saving…")
            await self.workers.wait_for_complete()
        self.exit()

"""Widgets and modal screens of the deltamem TUI."""

from __future__ import annotations

import json

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Collapsible, DataTable, Input, Label, Markdown, ProgressBar, Static, TextArea


class Prompt(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Alt+Enter) inserts a newline, Up/Down on the first/last line walk
    the input history."""

    BINDINGS = [
        Binding("enter", "send", "Send", priority=True),
        Binding("ctrl+j,alt+enter", "newline", "Newline", show=False, priority=True),
    ]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kw):
        super().__init__(soft_wrap=True, show_line_numbers=False, placeholder="Ask about the project…", **kw)
        self.sent: list[str] = []
        self._pos = 0

    def action_send(self) -> None:
        text = self.text.strip()
        if text:
            self.sent.append(text)
            self._pos = len(self.sent)
            self.post_message(self.Submitted(text))
            self.clear()

    def action_newline(self) -> None:
        self.insert("\n")

    def _on_key(self, event) -> None:
        if event.key == "up" and self.cursor_location[0] == 0 and self.sent:
            self._pos = max(0, self._pos - 1)
            self.text = self.sent[self._pos]
            event.prevent_default()
        elif event.key == "down" and self.cursor_location[0] == self.document.line_count - 1 and self.sent:
            self._pos = min(len(self.sent), self._pos + 1)
            self.text = self.sent[self._pos] if self._pos < len(self.sent) else ""
            event.prevent_default()


class UserMessage(Static):
    pass


class AssistantMessage(Markdown):
    pass


def tool_panel(event: dict) -> Collapsible:
    """A tool call and its result, collapsed; the title says which tool and whether it worked."""
    args = json.dumps(event["arguments"], ensure_ascii=False)
    status = "✓" if event["ok"] else "✗"
    body = Static(event["result"], classes="tool-result", markup=False)
    return Collapsible(body, title=f"{status} {event['tool']} {args[:80]}", collapsed=True, classes="tool")


class ChatLog(VerticalScroll):
    """The conversation: user turns, assistant answers (markdown, streamed), tool panels."""


class MemoryPanel(Vertical):
    """Tokens seen, state size, attention window fill, the session's snapshots (rewind / fork from them)."""

    def compose(self) -> ComposeResult:
        yield Label("Memory", classes="panel-title")
        yield Static(id="mem-stats")
        yield Label("attention window", classes="gauge-label")
        yield ProgressBar(id="window-fill", show_eta=False)
        yield Label("snapshots (r rewind · f fork)", classes="panel-title")
        table = DataTable(id="snapshots", cursor_type="row", zebra_stripes=True)
        table.add_columns("turn", "tokens", "size", "saved")
        yield table
        yield Static(id="ingest-status")
        yield ProgressBar(id="ingest-bar", show_eta=False, classes="hidden")


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, detail: str = ""):
        super().__init__()
        self.question, self.detail = question, detail

    def compose(self) -> ComposeResult:
        with Grid(id="dialog"):
            yield Label(self.question, id="question")
            yield Static(self.detail, id="detail", markup=False)
            yield Button("Yes (y)", variant="error", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class AskScreen(ModalScreen[str | None]):
    """One line of text from the user (a new title, a file name); Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = ""):
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label(self.question)
            yield Input(value=self.value, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


HELP = """\
# deltamem

Your conversation and the model's memory of the project persist between sessions: quitting keeps everything,
and coming back restores the model state instead of re-reading.

| key | action |
|---|---|
| Enter | send the message (Ctrl+J: new line; Up/Down: history) |
| Esc | stop the answer being generated |
| Ctrl+O | sessions: resume, fork, rename, delete, export |
| Ctrl+I | ingest the project's files (changed ones only) |
| r / f | in the memory panel: rewind to / fork from the selected snapshot |
| Ctrl+P | command palette |
| F1 | this help |
| Ctrl+Q | quit |

Risky tools (write_file, edit, shell) ask before they run.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)

"""The session browser: this project's sessions or all of them, filtered as you type; resume, fork, rename,
delete (confirmed) and export."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label

from deltamem.ui.format import size
from deltamem.ui.widgets import AskScreen, ConfirmScreen


class SessionsScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("enter", "resume", "Resume", priority=True),
        Binding("ctrl+f", "fork", "Fork", priority=True),
        Binding("ctrl+n", "rename", "Rename", priority=True),
        Binding("ctrl+d", "delete", "Delete", priority=True),
        Binding("ctrl+e", "export", "Export", priority=True),
        Binding("ctrl+a", "toggle_all", "This project / all", priority=True),
    ]

    def __init__(self, store, project_id: int | None, current: str | None):
        super().__init__()
        self.store, self.project_id, self.current = store, project_id, current
        self.all_projects = False

    def compose(self) -> ComposeResult:
        with Vertical(id="sessions"):
            yield Label("", id="sessions-title")
            yield Input(placeholder="filter by title, project or id…", id="filter")
            table = DataTable(id="session-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("title", "project", "turns", "tokens", "snapshot", "last used", "id")
            yield table
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.query_one("#filter", Input).focus()

    def reload(self) -> None:
        words = self.query_one("#filter", Input).value.lower().split()
        rows = self.store.sessions(None if self.all_projects else self.project_id)
        table = self.query_one("#session-table", DataTable)
        table.clear()
        for r in rows:
            hay = f"{r['title']} {r['project_name'] or ''} {r['id']}".lower()
            if all(w in hay for w in words):
                mark = "● " if r["id"] == self.current else ""
                table.add_row(
                    mark + r["title"],
                    r["project_name"] or "-",
                    str(r["turns"]),
                    f"{r['tokens_seen'] or 0:,}",
                    size(r["snapshot_bytes"]),
                    r["updated"][:16].replace("T", " "),
                    r["id"],
                    key=r["id"],
                )
        scope = "all projects" if self.all_projects else "this project"
        self.query_one("#sessions-title", Label).update(f"Sessions — {scope} ({table.row_count})  ctrl+a: switch")

    def on_input_changed(self, event: Input.Changed) -> None:
        self.reload()

    def selected(self) -> str | None:
        table = self.query_one("#session-table", DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def on_key(self, event) -> None:  # arrows move the table while typing in the filter
        if event.key in ("up", "down"):
            table = self.query_one("#session-table", DataTable)
            table.action_cursor_up() if event.key == "up" else table.action_cursor_down()
            event.stop()

    def action_resume(self) -> None:
        sid = self.selected()
        if sid:
            self.app.pop_screen()
            self.app.resume(sid)

    def action_fork(self) -> None:
        sid = self.selected()
        if sid:
            self.app.pop_screen()
            self.app.fork(source=sid)

    def action_rename(self) -> None:
        sid = self.selected()
        if sid:

            def go(title):
                if title:
                    self.store.rename(sid, title)
                    self.reload()

            self.app.push_screen(AskScreen("New title", self.store.session(sid)["title"]), go)

    def action_delete(self) -> None:
        sid = self.selected()
        if not sid:
            return
        if sid == self.current:
            self.app.notify("this session is open; switch to another one first", severity="warning")
            return
        title = self.store.session(sid)["title"]

        def go(ok: bool) -> None:
            if ok:
                from deltamem.agent import threads

                threads.delete(self.store, sid)
                self.app.notify(f"deleted {title}")
                self.reload()

        self.app.push_screen(ConfirmScreen(f"Delete session {title!r}?", "Its turns and snapshots are removed."), go)

    def action_export(self) -> None:
        sid = self.selected()
        if not sid:
            return
        title = self.store.session(sid)["title"]

        def go(path: str | None) -> None:
            if path:
                from deltamem.memory.errors import StoreError

                try:
                    info = self.store.export(sid, Path(path).expanduser())
                    self.app.notify(f"exported to {info['path']} ({size(info['bytes'])})")
                except StoreError as e:
                    self.app.notify(str(e), severity="error")

        self.app.push_screen(AskScreen("Export to file", f"{title}.dmsession"), go)

    def action_toggle_all(self) -> None:
        self.all_projects = not self.all_projects
        self.reload()

"""SVG snapshots of the main screens (pytest-textual-snapshot; textual is pinned so they are stable).
Regenerate after an intended change with `pytest tests/ui/test_snapshots.py --snapshot-update`."""

import pytest

from deltamem.ui.app import DeltamemApp
from deltamem.ui.widgets import ConfirmScreen, Prompt


@pytest.fixture()
def repo(tmp_path):
    r = tmp_path / "shop"
    r.mkdir()
    (r / "README.md").write_text("# Shop\n")
    return r


async def _ready(pilot):
    app = pilot.app
    for _ in range(1200):
        await pilot.pause(0.1)
        if app.agent is not None and not app.workers._workers:
            app.query_one(Prompt).cursor_blink = False  # a blinking cursor would make the pictures flicker
            await pilot.pause(0.1)
            return
    raise AssertionError("the model did not load")


def test_main_screen(snap_compare, repo, tmp_path):
    assert snap_compare(DeltamemApp(tmp_path / "m.db", repo), terminal_size=(110, 30), run_before=_ready)


def test_main_screen_80x24(snap_compare, repo, tmp_path):
    assert snap_compare(DeltamemApp(tmp_path / "m.db", repo), terminal_size=(80, 24), run_before=_ready)


def test_help_screen(snap_compare, repo, tmp_path):
    async def run_before(pilot):
        await _ready(pilot)
        await pilot.press("f1")

    assert snap_compare(DeltamemApp(tmp_path / "m.db", repo), terminal_size=(110, 30), run_before=run_before)


def test_confirm_dialog(snap_compare, repo, tmp_path):
    async def run_before(pilot):
        await _ready(pilot)
        pilot.app.push_screen(ConfirmScreen("Run write_file?", '{\n "path": "notes.txt",\n "content": "hi"\n}'))

    assert snap_compare(DeltamemApp(tmp_path / "m.db", repo), terminal_size=(110, 30), run_before=run_before)

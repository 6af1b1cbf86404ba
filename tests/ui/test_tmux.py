"""Smoke test: the real `deltamem tui` in a real terminal (tmux): it starts, takes a message, shows the answer
being generated, and quits with Ctrl+Q, leaving the turn saved."""

import os
import shlex
import shutil
import subprocess
import time

import pytest

from deltamem.memory.store import Store
from tests.test_app import CLI

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def screen(name):
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def wait_for(name, text, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in (s := screen(name)):
            return s
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared:\n{screen(name)}")


def test_tui_in_tmux(tmp_path):
    repo = tmp_path / "shop"
    repo.mkdir()
    (repo / "README.md").write_text("# Shop\n")
    db = tmp_path / "m.db"
    name = f"deltamem-smoke-{os.getpid()}"
    cmd = (
        f"{shlex.join(CLI)} tui --repo {repo} --db {db} "
        f"--max-new-tokens 8; echo EXITED $? ; sleep 30"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd],
        check=True,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    try:
        wait_for(name, "New session for shop")
        time.sleep(1)  # let the terminal driver finish its start-up exchange before typing
        subprocess.run(["tmux", "send-keys", "-t", name, "-l", "hello from tmux"], check=True)
        wait_for(name, "hello from tmux")
        subprocess.run(["tmux", "send-keys", "-t", name, "Enter"], check=True)
        deadline = time.time() + 120
        while time.time() < deadline:  # the answer is committed when the turn ends
            with Store(db) as store:
                if [t["role"] for t in store.turns("shop")][-1:] == ["assistant"]:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(screen(name))
        subprocess.run(["tmux", "send-keys", "-t", name, "C-q"], check=True)
        wait_for(name, "EXITED 0", timeout=30)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    with Store(db) as store:
        assert [t["text"] for t in store.turns("shop") if t["role"] == "user"] == ["hello from tmux"]

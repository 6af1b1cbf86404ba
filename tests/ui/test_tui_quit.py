"""The TUI in a real terminal (a pty): it opens while the model loads, and quitting then leaves at once instead of
waiting for the load (a cold start of the default model, the start-up cache off, takes seconds): the whole quit,
interpreter teardown included, takes less time than the load alone, measured on the same machine just before."""

import json
import os
import select
import subprocess
import time

import pytest

from tests.test_app import CLI, deltamem

pty = pytest.importorskip("pty")


def test_quitting_while_the_model_loads_is_immediate(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAMEM_CACHE", "off")
    info = deltamem("info", "--model", "default")
    assert info.returncode == 0, info.stderr
    load_s = json.loads(info.stdout)["load_s"]  # what waiting for the load would cost
    env = {
        **os.environ,
        "DELTAMEM_CACHE": "off",
        "TERM": "xterm-256color",
    }
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [*CLI, "tui", "--repo", str(tmp_path), "--db", str(tmp_path / "m.db")],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 120
    try:
        while b"loading" not in seen and time.monotonic() < deadline:  # the screen is up, the model loading
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 65536)
        assert b"loading" in seen, seen[-500:]
        os.write(master, b"\x11")  # ctrl+q
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < 30:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    break
        assert p.wait(timeout=30) == 0
        assert time.monotonic() - t0 < load_s
    finally:
        p.kill()
        os.close(master)

"""The shell tool: `bash -c command` in the project root, refused unless the context allows it.

The command runs in its own process group with no stdin. When it exits, or when it runs past ctx.shell_timeout,
the whole group is killed, so neither a hung command nor the background processes it started outlive the call.
stdout and stderr come back together; only the first and last parts of a long output are kept in memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import IO

from deltamem.tools.base import Tool, ToolContext, ToolError, kwargs_runner

READ_CHUNK = 65536
DRAIN_TIMEOUT = 5.0  # seconds to wait for the output pipe to close once the process group is killed


class _Output:
    """Reads a pipe to its end on a thread, keeping its first and last `keep` bytes and counting the rest."""

    def __init__(self, pipe: IO[bytes], keep: int):
        self.keep = keep
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe:
            while chunk := pipe.read1(READ_CHUNK):
                self.total += len(chunk)
                room = max(self.keep - len(self.head), 0)
                self.head += chunk[:room]
                self.tail += chunk[room:]
                if len(self.tail) > self.keep:
                    del self.tail[: len(self.tail) - self.keep]

    def text(self) -> str:
        self._thread.join(DRAIN_TIMEOUT)
        dropped = self.total - len(self.head) - len(self.tail)
        marker = f"\n[... {dropped:,} bytes of output omitted ...]\n".encode() if dropped else b""
        return (bytes(self.head) + marker + bytes(self.tail)).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def shell(ctx: ToolContext, command: str) -> str:
    if not ctx.allow_shell:
        raise ToolError("shell is disabled: the user has not allowed running commands in this session")
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=ctx.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, killed as a whole
    )
    output = _Output(proc.stdout, keep=max(ctx.max_output // 2 - 100, 0))  # head + tail fit the output cap
    try:
        code = proc.wait(timeout=ctx.shell_timeout)
    except subprocess.TimeoutExpired:
        code = None
    _kill_group(proc.pid)
    proc.wait()
    text = output.text() or "(no output)"
    if code is None:
        raise ToolError(f"command timed out after {ctx.shell_timeout:g} s and was killed; its output:\n{text}")
    return f"exit code: {code}\n{text}"


SHELL = Tool(
    "shell",
    "Run a bash command in the project root and return its exit code and combined stdout/stderr; it is killed if "
    "it runs too long, and background processes it starts do not outlive it.",
    {
        "type": "object",
        "properties": {"command": {"type": "string", "description": "bash command line"}},
        "required": ["command"],
    },
    True,
    kwargs_runner(shell),
)

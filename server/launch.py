"""`deltamem serve` as a child process on a free loopback port: the one launcher the tests and benchmarks use.

    with Served("--model", "random") as s:
        openai.OpenAI(base_url=s.url, api_key="-").models.list()
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The server started with these `deltamem serve` arguments (its port chosen here), ready once /health answers
    (start_s: how long that took). Its log (stderr) goes to a file: `log` where given, else a temporary one; read
    it with log_text(). (A pipe nobody reads would stall the server once full.)"""

    def __init__(self, *args: str, env: dict | None = None, log: Path | None = None, timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        if log is None:
            fd, name = tempfile.mkstemp(prefix="deltamem-serve-", suffix=".log")
            os.close(fd)
            log, self._own_log = Path(name), True
        else:
            self._own_log = False
        self.log = log
        cmd = [sys.executable, "-P", "-m", "deltamem.app", "serve", "--port", str(self.port), *args]
        t0 = time.perf_counter()
        with log.open("a") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"deltamem serve exited ({self.proc.returncode}): {self.log_text()[-2000:]}") \
                        from None
                if time.perf_counter() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"deltamem serve did not answer within {timeout:.0f} s") from None
                time.sleep(0.25)
        self.start_s = time.perf_counter() - t0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_log:
            self.log.unlink(missing_ok=True)

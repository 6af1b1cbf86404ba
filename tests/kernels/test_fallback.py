"""When Triton cannot serve CUDA tensors, the torch reference takes over and says so once, with the reason. A
broken triton install is made real: a `triton` package that fails on import, first on the subprocess's path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging
logging.basicConfig(format="deltamem: %(message)s")
from deltamem import kernels
print(kernels._has_triton(), kernels._has_triton())
"""


def test_a_broken_triton_is_logged_once_with_its_reason(tmp_path):
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object')\n")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
    assert r.stderr.splitlines() == [
        "deltamem: triton failed to import (ImportError: libcuda.so.1: cannot open shared object); the Gated "
        "DeltaNet ops run on the torch reference (slower on a GPU)"
    ]

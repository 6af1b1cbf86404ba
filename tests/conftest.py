import os

import pytest
import torch

pytest_plugins = ["tests.postgres"]  # the PostgreSQL server fixtures (postgres, pg_url), for any test that asks

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the CLI compiles the CPU decode step by default (about 40 s per model and window): only where a test asks for it
os.environ.setdefault("DELTAMEM_COMPILE", "0")
# a test that names no device runs on the CPU on any machine (ModelOptions' default, "auto", would take a GPU)
os.environ.setdefault("DELTAMEM_DEVICE", "cpu")
# the tests' databases keep their pieces where each test says, never in the object store a developer's shell names
os.environ.pop("DELTAMEM_OBJECTS", None)
if "DELTAMEM_CACHE" not in os.environ:  # the start-up cache of this test session, not the user's (subprocesses too)
    import atexit
    import shutil
    import tempfile

    os.environ["DELTAMEM_CACHE"] = tempfile.mkdtemp(prefix="deltamem-test-cache-")
    # removed when the session ends: each entry is a float32 copy of the default model (~0.6 GB)
    atexit.register(shutil.rmtree, os.environ["DELTAMEM_CACHE"], True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    """torch.empty filled with NaN, so code that reads memory it never wrote fails loudly (fla's habit). Not while
    torch.export traces a step (model/aot_step.py): the fill would become part of the compiled graph."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point() and not torch.compiler.is_exporting():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)

"""The CPU decode step compiled ahead of time (model/aot_step.py): built once into the start-up cache, loaded by
later engines without compiling, rebuilt when damaged, and always the eager engine's tokens and logits."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltamem.model import aot_step, load_model, packed

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="compiling the decode step needs a C++ compiler")  # fmt: skip


IDS = torch.randint(3, 200, (20,), generator=torch.Generator().manual_seed(7)).tolist()


def compiled(**kw):
    return load_model("random", window=64, quant="none", compile_decode=True, **kw)


def package_of(eng) -> Path:
    return aot_step.package(eng.fingerprint, eng.quant, eng.window, eng.sink, eng.dtype)


def test_step_is_kept_and_loaded_later_without_compiling(monkeypatch):
    plain = load_model("random", window=64)
    want = "".join(plain.generate(IDS, max_new_tokens=10, stop_ids=[]))
    first = compiled()
    assert "".join(first.generate(IDS, max_new_tokens=10, stop_ids=[])) == want
    assert first.generated == plain.generated
    assert package_of(first).is_file()

    def no_build(*a, **k):
        raise AssertionError("compiled again although the step is in the cache")

    monkeypatch.setattr(aot_step, "build", no_build)
    later = compiled()
    assert "".join(later.generate(IDS, max_new_tokens=10, stop_ids=[])) == want
    assert later._graph.compiled  # the library's step, not the eager fallback
    # the state each leaves is the eager engine's: the next token's logits agree
    assert torch.allclose(later.feed([5], logits="last"), plain.feed([5], logits="last"), atol=1e-4)
    sib = later.sibling()  # a new session's engine (TUI, LangChain) on the same weights decodes compiled too
    assert "".join(sib.generate(IDS, max_new_tokens=10, stop_ids=[])) == want and sib._graph.compiled


def test_damaged_step_is_compiled_again(caplog):
    eng = compiled()
    eng.feed(IDS[:2])  # a few ids go through the step: it is built (or loaded) here
    path = package_of(eng)
    path.write_bytes(b"not a package" * 100)
    plain = load_model("random", window=64)
    want = "".join(plain.generate(IDS, max_new_tokens=6, stop_ids=[]))
    again = compiled()
    with caplog.at_level(logging.WARNING, logger="deltamem.model.aot_step"):
        assert "".join(again.generate(IDS, max_new_tokens=6, stop_ids=[])) == want
    assert "could not load the compiled decode step" in caplog.text
    assert path.stat().st_size != len(b"not a package" * 100)


def test_few_ids_go_through_the_step_with_the_eager_logits():
    """feed() of at most STEP_FEED ids runs the compiled step once per id: the same logits as the eager
    layers for every row, and the same state after (the logits of what follows agree)."""
    plain, eng = load_model("random", window=64), compiled()
    for ids, mode in ((IDS[:5], "all"), (IDS[5:8], "last"), (IDS[8:9], "none"), (IDS[9:20], "all")):
        got, want = eng.feed(ids, logits=mode), plain.feed(ids, logits=mode)
        if mode == "none":
            assert got is None and want is None
        else:
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    assert eng.tokens_seen == plain.tokens_seen == 20 and eng.token_chain == plain.token_chain
    assert eng._graph.compiled  # the few-id feeds did use the compiled step


def test_auto_compiles_where_it_can(monkeypatch):
    assert load_model("random", window=64, quant="auto", compile_decode="auto").compile_decode
    assert load_model("random", window=64, quant="auto", compile_decode="auto").quant == shipped_quant()
    assert not load_model("random", window=64, quant="none", compile_decode="auto").compile_decode
    assert not load_model("random", window=None, compile_decode="auto").compile_decode  # unbounded: no fixed step
    assert not load_model("random", window=64, quant="int4", compile_decode=True).compile_decode  # see loader
    monkeypatch.setenv("DELTAMEM_CACHE", "off")  # nowhere to keep it: each launch would compile again
    assert not load_model("random", window=64, quant="auto", compile_decode="auto").compile_decode
    monkeypatch.undo()
    monkeypatch.setattr(aot_step, "compiler", lambda: None)
    eng = load_model("random", window=64, quant="auto", compile_decode="auto")
    assert not eng.compile_decode and eng.quant == "none"


def test_cli_compiles_once_then_loads(tmp_path):
    env = {**os.environ, "DELTAMEM_CACHE": str(tmp_path / "cache")}
    env.pop("DELTAMEM_COMPILE", None)

    def gen(*flags):
        cmd = [sys.executable, "-m", "deltamem.app", "generate", "--model", "random", "--window", "64", "--json",
               "--max-new-tokens", "8", "--quant", "none", *flags, "hello"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout), r.stderr

    first, err1 = gen("--compile")
    again, err2 = gen("--compile")
    eager, _ = gen("--no-compile")
    assert "compiling the decode step" in err1 and "compiling the decode step" not in err2
    assert first["text"] == again["text"] == eager["text"]
    assert list((tmp_path / "cache" / "aot").glob("step-*.pt2"))


def shipped_quant() -> str:
    return "int8" if packed.avx512() else "f16"


def test_default_model_compiled_step_matches_eager():
    """The shipped configuration (the default model, auto quant, compiled): the eager engine's greedy tokens with
    the same weights."""
    ids = torch.randint(3, 200, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    eng = load_model("default", quant="auto", compile_decode="auto")
    plain = load_model("default", quant=shipped_quant())
    assert eng.quant == shipped_quant() and eng.compile_decode
    want = "".join(plain.generate(ids, max_new_tokens=12, stop_ids=[]))
    got = "".join(eng.generate(ids, max_new_tokens=12, stop_ids=[]))
    assert eng._graph.compiled
    assert eng.generated == plain.generated and got == want
    assert torch.allclose(eng.feed([5], logits="last"), plain.feed([5], logits="last"), atol=1e-3)

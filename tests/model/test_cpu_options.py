"""Every --dtype/--quant/--compile combination `deltamem generate` accepts on the CPU: it either decodes the greedy
tokens the eager path decodes (the same dtype and weight format, nothing compiled: load_model in this process), or is
refused before anything is loaded or written, with one line and exit code 1."""

import json

import pytest
import torch

from deltamem.app import main
from deltamem.model import load_model
from deltamem.model.aot_step import compiler
from deltamem.model.packed import avx512

DTYPES = ["auto", "float32", "bfloat16", "float16"]
QUANTS = ["auto", "none", "f16", "int8", "int4"]
PROMPT = "The memory of a long session"


def _expected(dtype: str, quant: str, compiled: bool) -> tuple[str, str] | None:
    """(torch dtype, weight format) this combination should decode with, or None where it is refused."""
    real = "float32" if dtype == "auto" else dtype
    if real != "float32" and (quant not in ("auto", "none") or compiled):
        return None  # the quantized kernels and the compiled step compute in float32
    if quant == "auto":  # with the step compiled: int8 on AVX-512, f16 below; else float32 weights
        quant = ("int8" if avx512() else "f16") if compiled and real == "float32" else "none"
    return real, quant


@pytest.fixture(scope="module")
def eager_text():
    """Greedy text of the eager path for each (dtype, quant), computed once."""
    memo = {}

    def text(dtype: str, quant: str) -> str:
        if (dtype, quant) not in memo:
            engine = load_model("random", dtype=getattr(torch, dtype), quant=quant, compile_decode=False)
            ids = engine.tokenizer.encode(PROMPT)
            memo[dtype, quant] = "".join(engine.generate(ids, max_new_tokens=8, temperature=0.0))
        return memo[dtype, quant]

    return text


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_combination_decodes_like_the_eager_path_or_is_refused(dtype, quant, compiled, eager_text, tmp_path,
                                                                    capsys):
    if compiled and compiler() is None:
        pytest.skip("no C++ compiler: --compile cannot build")
    state = tmp_path / "s.snap"
    code = main(["generate", "--model", "random", "--device", "cpu", "--dtype", dtype, "--quant", quant,
                 "--compile" if compiled else "--no-compile", "--max-new-tokens", "8", "--temperature", "0",
                 "--state", str(state), "--json", PROMPT])
    out, err = capsys.readouterr()
    want = _expected(dtype, quant, compiled)
    if want is None:
        assert code == 1, err
        line = err.strip()
        assert "\n" not in line and ("--dtype float32" in line) and "Traceback" not in line, err
        assert not state.exists()  # refused before anything was written
        return
    assert code == 0, err
    assert "could not compile" not in err and "internal error" not in err, err
    assert json.loads(out)["text"] == eager_text(*want)


def test_compiling_the_step_prints_no_warnings(tmp_path):
    """The first decode compiles the step (the `make demo` path): the user sees deltamem's one-line notice, not
    torch's warnings (a FutureWarning torch 2.13's export raises about its own code)."""
    import os
    import subprocess

    from tests.test_app import CLI

    env = {**os.environ, "DELTAMEM_CACHE": str(tmp_path / "cache"), "DELTAMEM_COMPILE": "1"}
    for _ in range(2):  # compiles, then loads it from the start-up cache
        r = subprocess.run([*CLI, "generate", "--model", "random", "--quant", "int8", "--max-new-tokens", "4", "hi"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        assert all(line.startswith("deltamem: ") or "tokens" in line for line in r.stderr.splitlines()), r.stderr
        assert "Warning" not in r.stderr, r.stderr

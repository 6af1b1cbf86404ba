"""The deltamem command, run as a real subprocess: generate, save and resume a state file, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The installed console script, as users run it (not the checkout's app.py: a script's folder goes first on sys.path,
# and the repo root's folders are named like other distributions)
CLI = [str(Path(sys.executable).with_name("deltamem"))]


def deltamem(*args, stdin=None, wait=True):
    """The installed CLI run to its end (or, wait=False, started: a Popen with its output piped)."""
    if not wait:
        return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=600)


def test_generate_saves_and_resumes_state(tmp_path):
    state = tmp_path / "s.snap"
    first = deltamem("generate", "--state", str(state), "--json", "--max-new-tokens", "5", "Hello, memory")
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    assert not a["resumed"] and a["new_tokens"] == 5 and state.exists()
    second = deltamem("generate", "--state", str(state), "--json", "--max-new-tokens", "5", " and again")
    b = json.loads(second.stdout)
    # Resumed: the new run fed only its own prompt, on top of everything the first run consumed.
    assert b["resumed"] and b["tokens_seen"] == a["tokens_seen"] + b["prompt_tokens"] + b["new_tokens"]


def test_stdin_prompt_and_text_output():
    r = deltamem("generate", "--max-new-tokens", "3", "--seed", "1", "--temperature", "0.8", "-", stdin="hi")
    assert r.returncode == 0, r.stderr
    assert "3 tokens" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "no/such/dir", "x"], "no model at"),
        (["generate", "--window", "0", "x"], "--window must be >= 1"),
        (["generate", "--max-new-tokens", "3", "--top-p", "0", "x"], "top_p"),
        (["generate", "--max-new-tokens", "3", "--repetition-penalty", "0", "x"], "--repetition-penalty must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    r = deltamem(*args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_corrupt_state_file_is_refused_and_kept(tmp_path):
    state = tmp_path / "s.snap"
    state.write_bytes(b"DMSNAP\n garbage")
    r = deltamem("generate", "--state", str(state), "--max-new-tokens", "2", "x")
    assert r.returncode == 1 and "snapshot" in r.stderr and "Traceback" not in r.stderr
    assert state.read_bytes() == b"DMSNAP\n garbage"  # nothing overwritten


def test_unknown_option_exits_2():
    r = deltamem("generate", "--bogus", "x")
    assert r.returncode == 2 and "usage:" in r.stderr


def test_plain_deltamem_without_a_terminal_prints_help():
    r = deltamem()  # stdin/stdout are pipes here; in a terminal this opens the TUI
    assert r.returncode == 2 and "usage: deltamem" in r.stderr and "tui" in r.stderr


@pytest.mark.parametrize("command", ["generate", "run"])
def test_out_of_memory_exits_5_and_says_so(command, tmp_path):
    """A window whose cache cannot be allocated: a real allocation failure, named as such (not a bad input, a model
    error or an internal error)."""
    extra = ["--repo", str(tmp_path), "--db", str(tmp_path / "m.db")] if command == "run" else []
    r = deltamem(command, "--model", "random", "--window", "1000000000", *extra, "hi")
    assert r.returncode == 5, r.stderr
    assert "not enough memory" in r.stderr and "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert not (tmp_path / "m.db").exists() or command == "run"



def test_tui_checks_its_model_options_before_opening():
    r = deltamem("tui", "--sink", "-1")
    assert r.returncode == 1 and "--sink must be >= 0" in r.stderr


def test_chat_json_prints_one_object_per_turn(tmp_path):
    r = subprocess.run(
        [*CLI, "chat", "--model", "random", "--repo", str(tmp_path), "--db", str(tmp_path / "m.db"),
         "--max-new-tokens", "2", "--json"],
        input="hello\nand again\n", capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert [t["outcome"] in ("answer", "step_limit") for t in turns] == [True, True]
    assert turns[1]["tokens_seen"] == turns[0]["tokens_seen"] + turns[1]["tokens_fed"]


def test_deltamem_delta_picks_another_delta_for_the_default_model(tmp_path, monkeypatch):
    """DELTAMEM_DELTA (A/B evaluations, benchmarks/agent_eval.py): the default model built from another delta file
    is another model (its own fingerprint); a missing file is one clear line."""
    from safetensors.torch import load_file, save_file

    from deltamem.model.distilled import DELTA

    monkeypatch.setenv("DELTAMEM_DELTA", str(tmp_path / "missing.safetensors"))
    r = deltamem("info", "--model", "default")
    assert r.returncode == 1 and "DELTAMEM_DELTA" in r.stderr and "Traceback" not in r.stderr
    tensors = load_file(str(DELTA))
    name = next(k for k in sorted(tensors) if k.endswith("norm.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"window": "1024", "sink": "4"})
    monkeypatch.setenv("DELTAMEM_DELTA", str(tmp_path / "other.safetensors"))
    other = json.loads(deltamem("info", "--model", "default").stdout)
    monkeypatch.delenv("DELTAMEM_DELTA")
    shipped = json.loads(deltamem("info", "--model", "default").stdout)
    assert other["fingerprint"] != shipped["fingerprint"] and other["layer_types"] == shipped["layer_types"]

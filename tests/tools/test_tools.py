"""Each tool on real files, checked against an independent reference (re.finditer, str.splitlines, str.replace,
os.listdir, pathlib glob), in a real git repository and in a plain folder where .gitignore matters; shell with
real processes; recall and note on a real memory store; run_tool on malformed calls."""

import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from deltamem.memory.store import Store
from deltamem.tools import Tool, ToolContext, default_tools, project_files, run_tool
from deltamem.tools.sandbox import MAX_READ

TOOLS = default_tools()


def call(ctx, name, **args):
    return run_tool(ctx, TOOLS, name, args)


def ok(ctx, name, **args):
    success, out = call(ctx, name, **args)
    assert success, out
    return out


def write(root, rel, data):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)


# --- a project where .gitignore matters ------------------------------------------------------------------------
FILES = {
    ".gitignore": "*.log\nbuild/\nsecret_*\n",
    "a.py": "import re\nneedle = 1\n\nprint(needle)  # needle twice\n",
    "README.md": "# Title\nno match here\nNeedle (capital)\n",
    "sub/b.py": "def f():\n    return 'needle'\n",
    "sub/deep/c.txt": "x\ny\nneedle at the end\n",
    "sub/deep/d.py": "pass\n",
    "notes.log": "needle in a log\n",
    "build/gen.py": "needle = 'generated'\n",
    "secret_key.txt": "needle secret\n",
    "sub/secret_b.py": "needle\n",
    "img.bin": b"\x89PNG\0\0needle\0",
}
IGNORED = {"notes.log", "build/gen.py", "secret_key.txt", "sub/secret_b.py"}
VISIBLE = sorted(set(FILES) - IGNORED)


@pytest.fixture(params=["git", "plain"])
def project(request, tmp_path):
    """FILES under tmp_path/proj: a git repository (one file staged, the rest untracked) or a plain folder."""
    root = tmp_path / "proj"
    root.mkdir()
    for rel, data in FILES.items():
        write(root, rel, data)
    (root / "link_to_a.py").symlink_to("a.py")  # symlinks are left out of listings
    if request.param == "git":
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run(["git", "add", "a.py"], cwd=root, check=True)
    else:
        assert subprocess.run(["git", "rev-parse"], cwd=root, capture_output=True).returncode != 0
    return root


def test_project_files_respect_gitignore(project):
    assert project_files(project) == sorted(Path(p) for p in VISIBLE)
    small = project_files(project, max_bytes=len(FILES["sub/b.py"]))
    assert small == sorted(Path(p) for p in VISIBLE if len(FILES[p]) <= len(FILES["sub/b.py"]))


def reference_grep(root, pattern, files):
    """(path, line number, line) of every match, by re.finditer over each whole file; smart case as ripgrep's:
    ignoring case unless the pattern has a capital outside an escape (the patterns here have no spaces)."""
    hits = set()
    smart = 0 if any(c.isupper() for c in re.sub(r"\\.", "", pattern)) else re.IGNORECASE
    for rel in files:
        text = (root / rel).read_text()
        lines = text.splitlines()
        for m in re.finditer(pattern, text, re.MULTILINE | smart):
            n = text.count("\n", 0, m.start()) + 1
            hits.add((rel, n, lines[n - 1]))
    return hits


def parse_grep(out):
    hits = set()
    for line in out.splitlines():
        if line.startswith(("(skipped", "no matches")) or re.match(r"\d+ files: ", line):
            continue
        path, n, text = line.split(":", 2)
        hits.add((path, int(n), text.removeprefix(" ")))
    return hits


TEXT_VISIBLE = [p for p in VISIBLE if isinstance(FILES[p], str)]


@pytest.mark.parametrize("pattern", ["needle", r"^\s+return", r"ne+dle\b.*$", "(?i)needle", "[A-Z]", "nothing-like-it"])
def test_grep_matches_reference(project, pattern):
    out = ok(ToolContext(project), "grep", pattern=pattern)
    assert parse_grep(out) == reference_grep(project, pattern, TEXT_VISIBLE)
    assert out.endswith("\n(skipped 1 binary, unreadable or over-1,048,576-byte file(s))")  # img.bin
    for ignored in IGNORED:
        assert ignored not in out


def test_grep_path_and_glob(project):
    ctx = ToolContext(project)
    sub = [p for p in TEXT_VISIBLE if p.startswith("sub/")]
    assert parse_grep(ok(ctx, "grep", pattern="needle", path="sub")) == reference_grep(project, "needle", sub)
    py = [p for p in TEXT_VISIBLE if p.endswith(".py")]
    assert parse_grep(ok(ctx, "grep", pattern="needle", glob="*.py")) == reference_grep(project, "needle", py)
    sub_py = [p for p in py if p.startswith("sub/")]
    assert parse_grep(ok(ctx, "grep", pattern=".", glob="sub/**/*.py")) == reference_grep(project, ".", sub_py)
    # a file named explicitly is searched even if .gitignore excludes it
    assert ok(ctx, "grep", pattern="needle", path="notes.log") == "notes.log:1: needle in a log"
    assert ok(ctx, "grep", pattern="zzz", path="a.py") == "no matches for 'zzz'"


def test_grep_errors_and_caps(tmp_path):
    ctx = ToolContext(tmp_path)
    assert call(ctx, "grep", pattern="(unclosed") == (
        False,
        "error: bad regular expression '(unclosed': missing ), unterminated subpattern at position 0",
    )
    write(tmp_path, "many.txt", "hit\n" * 500)
    write(tmp_path, "huge.txt", "hit\n" * (MAX_READ // 4 + 10))
    out = ok(ctx, "grep", pattern="hit", path="many.txt")
    lines = out.splitlines()
    assert lines[:200] == [f"many.txt:{n}: hit" for n in range(1, 201)]
    assert lines[200] == "[... stopped after 200 matches; narrow the pattern, path or glob]" and len(lines) == 201
    success, out = call(ctx, "grep", pattern="ab-" * 100)  # a repeating pattern over the schema's maxLength
    assert (success, out) == (False, "error: argument 'pattern' of grep is 300 characters, over its limit of 256")
    success, out = call(ctx, "grep", pattern="hit", path="huge.txt")
    assert not success and "over 1,048,576 bytes" in out
    out = ok(ctx, "grep", pattern="nothing", path=".")
    assert out == "no matches for 'nothing'\n(skipped 1 binary, unreadable or over-1,048,576-byte file(s))"
    # search says so too, whether it finds lines or none
    found = ok(ctx, "search", query="hit").splitlines()  # the best match stays last, as answers cite it
    assert found[-2:] == [
        "(skipped 1 binary, unreadable or over-1,048,576-byte file(s))",
        "(best match: many.txt, line 1: hit)",
    ]
    out = ok(ctx, "search", query="nothing")
    assert out == (
        "no match for 'nothing': any line with the words nothing (word forms included)"
        "\n(skipped 1 binary, unreadable or over-1,048,576-byte file(s))"
    )


def test_grep_smart_case_whitespace_hints_and_files(tmp_path):
    """What a small model's searches need: a lower-case phrase finds the capitalised one, a space any run of
    whitespace (justified PDF text, aligned code); a search with capitals that misses says what ignoring case finds;
    matches in several files list those files first."""
    ctx = ToolContext(tmp_path)
    write(tmp_path, "lease.txt", "9. The  Termination\tclause applies.\n")
    write(tmp_path, "a.js", "export const MAX_RETRIES = 5;\n")
    write(tmp_path, "b.js", "import { MAX_RETRIES } from './a.js';\nretry(MAX_RETRIES);\n")
    write(tmp_path, "c.py", "retries = 3\n")
    assert ok(ctx, "grep", pattern="termination clause") == "lease.txt:1: 9. The  Termination\tclause applies."
    out = ok(ctx, "grep", pattern="Termination Clause")
    assert out.splitlines() == [
        "no matches for 'Termination Clause' (case-sensitive: it has capitals); ignoring case:",
        "lease.txt:1: 9. The  Termination\tclause applies.",
    ]
    assert ok(ctx, "grep", pattern=r"\bmax_retries\b").splitlines() == [
        "2 files: a.js, b.js",
        "a.js:1: export const MAX_RETRIES = 5;",
        "b.js:1: import { MAX_RETRIES } from './a.js';",
        "b.js:2: retry(MAX_RETRIES);",
    ]
    assert ok(ctx, "grep", pattern=r"\Sretries").splitlines() == [  # \S is an escape, not a capital
        "2 files: a.js, b.js",
        "a.js:1: export const MAX_RETRIES = 5;",
        "b.js:1: import { MAX_RETRIES } from './a.js';",
        "b.js:2: retry(MAX_RETRIES);",
    ]
    assert (
        ok(ctx, "grep", pattern="Retries") == "no matches for 'Retries' (case-sensitive: it has capitals); "
        "ignoring case:\n3 files: a.js, b.js, c.py\na.js:1: export const MAX_RETRIES = 5;\n"
        "b.js:1: import { MAX_RETRIES } from './a.js';\nb.js:2: retry(MAX_RETRIES);\nc.py:1: retries = 3"
    )
    # a pattern shaped for another language: the lines with the name it spells
    write(tmp_path, "cli.js", "export function parseArgs(argv) {\n  return argv;\n}\n")
    assert ok(ctx, "grep", pattern=r"def parseArgs\b").splitlines() == [
        r"no matches for 'def parseArgs\\b'; the lines with most of its words (parseargs):",
        "cli.js:1: export function parseArgs(argv) {",
        "(best match: cli.js, line 1: export function parseArgs(argv) {)",
    ]
    assert ok(ctx, "grep", pattern=r"^MAX_RETRIES =").splitlines() == [
        "no matches for '^MAX_RETRIES ='; the lines with most of its words (max, retries):",
        "2 files: a.js, b.js",
        "a.js:1: export const MAX_RETRIES = 5;",
        "b.js:1: import { MAX_RETRIES } from './a.js';",
        "b.js:2: retry(MAX_RETRIES);",
        "(best match: a.js, line 1: export const MAX_RETRIES = 5;)",
    ]
    # a phrase with a word the text does not use: the line with the most (and rarest) of its words comes first
    write(
        tmp_path,
        "minutes.txt",
        "The warranty period for product line Quarry is 3 years.\n"
        "The warranty period for product line Zephyr is 8 years.\nProduct lines: 4.\n",
    )
    out = ok(ctx, "grep", pattern="wrench warranty period for product line Zephyr", path="minutes.txt")
    assert out.splitlines()[1] == "minutes.txt:2: The warranty period for product line Zephyr is 8 years.", out
    assert (
        out.splitlines()[-1] == "(best match: minutes.txt, line 2: The warranty period for product line Zephyr "
        "is 8 years.)"
    )
    assert ok(ctx, "grep", pattern="class Nowhere") == "no matches for 'class Nowhere'"
    # spaces inside a class or before a quantifier keep their meaning
    assert ok(ctx, "grep", pattern="retries[ ]=", path="c.py") == "c.py:1: retries = 3"
    assert ok(ctx, "grep", pattern="retries *= 3", path="c.py") == "c.py:1: retries = 3"
    assert ok(ctx, "grep", pattern="retries  {2}=", path="c.py").splitlines() == [
        "no matches for 'retries  {2}='; the lines with most of its words (retries):",
        "c.py:1: retries = 3",
        "(best match: c.py, line 1: retries = 3)",
    ]


def test_glob_matches_pathlib_minus_ignored(project):
    ctx = ToolContext(project)
    for pattern in ["**/*.py", "*.py", "sub/*", "sub/**/*", "*", "**/*"]:
        expected = sorted(
            rel.as_posix()
            for rel in (p.relative_to(project) for p in project.glob(pattern))
            if (project / rel).is_file()
            and not (project / rel).is_symlink()
            and rel.as_posix() not in IGNORED
            and ".git" not in rel.parts
        )
        assert ok(ctx, "glob", pattern=pattern).splitlines() == expected, pattern
    assert ok(ctx, "glob", pattern="*.rs") == "no files match '*.rs'"
    assert "bad glob pattern" in call(ctx, "glob", pattern="a**b")[1]


def test_nested_gitignore_and_tracked_ignored_files_in_git(tmp_path):
    """In a git repository git decides: a nested .gitignore counts, and a tracked file stays listed though ignored."""
    root = tmp_path / "repo"
    for rel, data in FILES.items():
        write(root, rel, data)
    write(root, "sub/.gitignore", "*.txt\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-f", "notes.log"], cwd=root, check=True)
    expected = (set(VISIBLE) | {"sub/.gitignore", "notes.log"}) - {"sub/deep/c.txt"}
    assert project_files(root) == sorted(Path(p) for p in expected)
    assert (root / ".git").is_dir() and not any(".git" in p.parts for p in project_files(root))


# --- list_dir and read_file ------------------------------------------------------------------------------------
def test_list_dir_matches_listdir(project):
    ctx = ToolContext(project)
    for rel in [".", "sub", "sub/deep"]:
        d = project / rel
        expected = sorted(n + "/" if (d / n).is_dir() else n for n in os.listdir(d) if n != ".git")
        assert ok(ctx, "list_dir", path=rel).splitlines() == expected
    assert ok(ctx, "list_dir") == ok(ctx, "list_dir", path=".")
    assert ".git/" not in ok(ctx, "list_dir").splitlines()


def test_list_dir_cap_and_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    ctx = ToolContext(tmp_path)
    assert ok(ctx, "list_dir", path="empty") == "(empty directory)"
    many = tmp_path / "many"
    many.mkdir()
    for i in range(620):
        (many / f"f{i:04d}").touch()
    lines = ok(ctx, "list_dir", path="many").splitlines()
    assert lines[:500] == [f"f{i:04d}" for i in range(500)] and lines[500:] == ["[... 120 more entries]"]


TEXT = "".join(f"line {i} of the file {'x' * (i % 7)}\n" for i in range(1, 41))


@pytest.mark.parametrize(("start", "end"), [(1, None), (3, 7), (5, 5), (40, None), (38, 100), (1, 40)])
def test_read_file_ranges_match_splitlines(tmp_path, start, end):
    write(tmp_path, "f.txt", TEXT)
    args = {"path": "f.txt", "start_line": start} | ({"end_line": end} if end else {})
    out = ok(ToolContext(tmp_path), "read_file", **args)
    lines = TEXT.splitlines()
    stop = len(lines) if end is None else min(end, len(lines))
    got = [(int(n), text) for n, text in (row.split("| ", 1) for row in out.split("\n"))]
    assert got == [(n, lines[n - 1]) for n in range(start, stop + 1)]
    assert out.split("\n")[0] == f"{start:5d}| {lines[start - 1]}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"start_line": 0}, "start_line must be >= 1, got 0"),
        ({"start_line": 5, "end_line": 4}, "end_line (4) is before start_line (5)"),
        ({"start_line": 41}, "start_line 41 is past the end of 'f.txt' (40 lines)"),
    ],
)
def test_read_file_bad_ranges(tmp_path, args, message):
    write(tmp_path, "f.txt", TEXT)
    assert call(ToolContext(tmp_path), "read_file", path="f.txt", **args) == (False, f"error: {message}")


def test_read_file_crlf_empty_and_null_optional(tmp_path):
    ctx = ToolContext(tmp_path)
    write(tmp_path, "crlf.txt", b"one\r\ntwo\r\n")
    assert ok(ctx, "read_file", path="crlf.txt") == "    1| one\n    2| two"
    write(tmp_path, "empty.txt", "")
    assert ok(ctx, "read_file", path="empty.txt") == "(empty file)"
    assert ok(ctx, "read_file", path="crlf.txt", start_line=2, end_line=None) == "    2| two"


def test_read_file_over_the_cap_shows_the_start(tmp_path):
    line = "y" * 99 + "\n"
    write(tmp_path, "big.txt", line * (2 * MAX_READ // 100))
    ctx = ToolContext(tmp_path, max_output=10**9)
    out = ok(ctx, "read_file", path="big.txt")
    rows = out.split("\n")
    assert len(rows) == MAX_READ // 100 + 1
    assert rows[-1] == f"[... big.txt is {2 * MAX_READ // 100 * 100:,} bytes; read_file reads only the first 1,048,576]"
    success, out = call(ctx, "read_file", path="big.txt", start_line=MAX_READ // 100 + 5)
    assert not success and "past the first 1,048,576 bytes" in out


# --- write_file and edit ---------------------------------------------------------------------------------------
def test_write_file_round_trip(tmp_path):
    ctx = ToolContext(tmp_path)
    content = "héllo\nwörld\r\nno newline at the end"
    assert ok(ctx, "write_file", path="new/deep/f.txt", content=content) == (
        f"created new/deep/f.txt ({len(content.encode()):,} bytes, 3 lines)"
    )
    assert (tmp_path / "new/deep/f.txt").read_bytes() == content.encode()
    assert ok(ctx, "write_file", path="new/deep/f.txt", content="") == "overwrote new/deep/f.txt (0 bytes, 0 lines)"
    assert (tmp_path / "new/deep/f.txt").read_bytes() == b""
    assert sorted(os.listdir(tmp_path / "new/deep")) == ["f.txt"]  # no temp file left behind


def test_write_file_keeps_mode_and_writes_through_inside_symlinks(tmp_path):
    ctx = ToolContext(tmp_path)
    write(tmp_path, "run.sh", "#!/bin/sh\n")
    os.chmod(tmp_path / "run.sh", 0o755)
    ok(ctx, "write_file", path="run.sh", content="#!/bin/sh\necho hi\n")
    assert stat.S_IMODE((tmp_path / "run.sh").stat().st_mode) == 0o755
    (tmp_path / "alias.sh").symlink_to("run.sh")
    ok(ctx, "write_file", path="alias.sh", content="changed\n")
    assert (tmp_path / "alias.sh").is_symlink() and (tmp_path / "run.sh").read_text() == "changed\n"


@pytest.mark.parametrize(
    ("old", "new"),
    [("needle = 1", "needle = 2"), ("import re\n", ""), ("  # needle twice", " # once"), ("print", "print\nprint")],
)
def test_edit_matches_str_replace(tmp_path, old, new):
    text = FILES["a.py"]
    write(tmp_path, "a.py", text)
    out = ok(ToolContext(tmp_path), "edit", path="a.py", old=old, new=new)
    assert out == f"edited a.py: replaced the occurrence at line {text[: text.index(old)].count(chr(10)) + 1}"
    assert (tmp_path / "a.py").read_text() == text.replace(old, new)


@pytest.mark.parametrize(
    ("old", "message"),
    [
        ("needle", "old text occurs 3 times in 'a.py'; it must occur exactly once (add context)"),
        ("ee", "old text occurs 3 times in 'a.py'"),
        ("missing", "old text not found in 'a.py' (it must match exactly, whitespace included)"),
        ("", "old must not be empty"),
    ],
)
def test_edit_needs_exactly_one_occurrence(tmp_path, old, message):
    write(tmp_path, "a.py", FILES["a.py"])
    success, out = call(ToolContext(tmp_path), "edit", path="a.py", old=old, new="x")
    assert not success and out.startswith(f"error: {message}")
    assert (tmp_path / "a.py").read_text() == FILES["a.py"]


def test_edit_counts_overlapping_occurrences(tmp_path):
    write(tmp_path, "f.txt", "aaa\n")
    assert "old text occurs 2 times" in call(ToolContext(tmp_path), "edit", path="f.txt", old="aa", new="b")[1]


# --- shell -----------------------------------------------------------------------------------------------------
def alive(pid):
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid, seconds=5.0):
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_shell_refused_unless_allowed(tmp_path):
    success, out = call(ToolContext(tmp_path), "shell", command="touch made")
    assert not success and "shell is disabled" in out
    assert not (tmp_path / "made").exists()


def test_shell_runs_in_root_with_exit_code_and_both_streams(tmp_path):
    ctx = ToolContext(tmp_path, allow_shell=True)
    out = ok(ctx, "shell", command="pwd; echo out; echo err >&2; exit 3")
    assert out == f"exit code: 3\n{tmp_path.resolve()}\nout\nerr\n"
    assert ok(ctx, "shell", command="true") == "exit code: 0\n(no output)"


def test_shell_timeout_kills_the_process_group(tmp_path):
    ctx = ToolContext(tmp_path, allow_shell=True, shell_timeout=1.0)
    t0 = time.monotonic()
    success, out = call(ctx, "shell", command="echo started; sleep 100 & echo $! > bg.pid; sleep 100")
    assert time.monotonic() - t0 < 4
    assert not success
    assert out == "error: command timed out after 1 s and was killed; its output:\nstarted\n"
    assert wait_dead(int((tmp_path / "bg.pid").read_text()))


def test_shell_background_processes_do_not_outlive_the_command(tmp_path):
    ctx = ToolContext(tmp_path, allow_shell=True)
    t0 = time.monotonic()
    assert ok(ctx, "shell", command="sleep 100 & echo $! > bg.pid; echo done") == "exit code: 0\ndone\n"
    assert time.monotonic() - t0 < 4
    assert wait_dead(int((tmp_path / "bg.pid").read_text()))


def test_shell_long_output_keeps_head_and_tail(tmp_path):
    ctx = ToolContext(tmp_path, allow_shell=True, max_output=2000)
    out = ok(ctx, "shell", command="seq 1 200000")
    assert len(out) <= 2000
    assert out.startswith("exit code: 0\n1\n2\n3\n") and out.endswith("\n199999\n200000\n")
    full = "".join(f"{i}\n" for i in range(1, 200001)).encode()
    omitted = int(re.search(r"\[\.\.\. ([\d,]+) bytes of output omitted \.\.\.\]", out).group(1).replace(",", ""))
    assert omitted == len(full) - 2 * (2000 // 2 - 100)


# --- truncation ------------------------------------------------------------------------------------------------
def test_run_tool_truncates_with_a_marker(tmp_path):
    write(tmp_path, "f.txt", TEXT)
    full = ok(ToolContext(tmp_path), "read_file", path="f.txt")
    success, out = call(ToolContext(tmp_path, max_output=300), "read_file", path="f.txt")
    assert success
    assert out == full[:300] + f"\n[... truncated: {len(full) - 300:,} more characters]"
    path = "missing/" + "m" * 50
    error = call(ToolContext(tmp_path), "read_file", path=path)[1]
    success, out = call(ToolContext(tmp_path, max_output=20), "read_file", path=path)
    assert not success and out == error[:20] + f"\n[... truncated: {len(error) - 20:,} more characters]"


# --- recall and note on a real store ---------------------------------------------------------------------------
@pytest.fixture()
def memory(tmp_path):
    store = Store(tmp_path / "memory.db")
    sid = store.create_session("s", "fp")
    yield ToolContext(tmp_path, store=store, session_id=sid)
    store.close()


def test_note_then_recall(memory):
    assert call(memory, "note", text="The deploy password is swordfish-42.") == (True, "noted")
    assert memory.store.turns(memory.session_id) == []  # kept for the run's own transaction
    assert ok(memory, "recall", query="deploy password") == "this run's note: The deploy password is swordfish-42."
    assert ok(memory, "recall", query="deploy unicorn") == "nothing found for 'deploy unicorn'"
    # what the agent does when the run saves its turn
    memory.store.save_turn(memory.session_id, memory.pending_turns)
    memory.pending_turns.clear()
    memory.store.save_turn(memory.session_id, [{"role": "user", "text": "we talked about\nswordfish too"}])
    turns = memory.store.turns(memory.session_id)
    assert [(t["role"], t["text"]) for t in turns][0] == ("note", "The deploy password is swordfish-42.")
    out = ok(memory, "recall", query="swordfish")
    lines = out.splitlines()
    assert sorted(lines) == sorted(
        [
            "turn 1 (note): The deploy password is [swordfish]-42.",
            "turn 2 (user): we talked about [swordfish] too",
        ]
    )
    assert len(ok(memory, "recall", query="swordfish", limit=1).splitlines()) == 1
    assert ok(memory, "recall", query="unicorn") == "nothing found for 'unicorn'"


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("recall", {"query": '"unbalanced'}, "error: bad search query '\"unbalanced': unterminated string"),
        ("recall", {"query": "x", "limit": 0}, "error: limit must be between 1 and 50, got 0"),
        ("recall", {"query": "  "}, "error: query must not be empty"),
        ("note", {"text": ""}, "error: text must not be empty"),
    ],
)
def test_memory_tool_errors(memory, name, args, message):
    # FTS5 reports a syntax error only once there is a row to match against
    memory.store.save_turn(memory.session_id, [{"role": "user", "text": "hello"}])
    success, out = call(memory, name, **args)
    assert not success and out.startswith(message), out


@pytest.mark.parametrize("name", ["recall", "note"])
def test_memory_tools_without_a_store(tmp_path, name):
    success, out = run_tool(ToolContext(tmp_path), TOOLS, name, {"query": "x"} if name == "recall" else {"text": "x"})
    assert not success and "no memory store or session" in out


# --- run_tool never raises -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "nope",
            {},
            "unknown tool 'nope'; the tools are: definition, edit, glob, grep, list_dir, map, note, read_file, "
            "recall, references, search, shell, write_file",
        ),
        (None, {}, "unknown tool None"),
        (["read_file"], {}, "unknown tool ['read_file']"),
        ("read_file", {}, "read_file is missing required argument(s): path"),
        ("edit", {"path": "f.txt"}, "edit is missing required argument(s): old, new"),
        ("write_file", {"path": "f.txt", "content": None}, "missing required argument(s): content"),
        ("read_file", {"path": 3}, "argument 'path' of read_file must be string, got integer"),
        ("read_file", {"path": "f.txt", "start_line": "3"}, "'start_line' of read_file must be integer, got string"),
        ("read_file", {"path": "f.txt", "start_line": True}, "'start_line' of read_file must be integer, got boolean"),
        ("read_file", {"path": "f.txt", "start_line": 2.0}, "'start_line' of read_file must be integer, got number"),
        ("write_file", {"path": "f.txt", "content": ["a"]}, "'content' of write_file must be string, got array"),
        ("read_file", {"path": "f.txt", "mode": "r"}, "read_file got unexpected argument(s) 'mode'; it takes: path,"),
        ("read_file", ["f.txt"], "the arguments of read_file must be a JSON object, got array"),
        ("read_file", "f.txt", "the arguments of read_file must be a JSON object, got string"),
        ("list_dir", 7, "the arguments of list_dir must be a JSON object, got integer"),
    ],
)
def test_run_tool_rejects_bad_calls(tmp_path, name, args, message):
    write(tmp_path, "f.txt", "x\n")
    success, out = run_tool(ToolContext(tmp_path), TOOLS, name, args)
    assert not success and out.startswith("error: ") and message in out, out


def test_run_tool_turns_exceptions_into_errors(tmp_path):
    def boom(ctx, args):
        raise RuntimeError("boom")

    tools = {"boom": Tool("boom", "Fails.", {"type": "object", "properties": {}}, False, boom)}
    assert run_tool(ToolContext(tmp_path), tools, "boom", {}) == (False, "error: RuntimeError: boom")
    assert run_tool(ToolContext(tmp_path), tools, "boom", None) == (False, "error: RuntimeError: boom")
    assert run_tool(ToolContext(tmp_path), TOOLS, "list_dir", None) == (True, "(empty directory)")


def test_default_tools_schemas_and_risk():
    names = {
        "list_dir",
        "read_file",
        "grep",
        "search",
        "map",
        "glob",
        "definition",
        "references",
        "write_file",
        "edit",
        "shell",
        "recall",
        "note",
    }
    assert set(TOOLS) == names
    assert {n for n, t in TOOLS.items() if t.risky} == {"write_file", "edit", "shell"}
    for name, tool in TOOLS.items():
        assert tool.name == name and tool.description
        schema = tool.parameters
        assert schema["type"] == "object" and set(schema["required"]) <= set(schema["properties"])
        assert all(p["type"] in {"string", "integer", "boolean"} for p in schema["properties"].values())

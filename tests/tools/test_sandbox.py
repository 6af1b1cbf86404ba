"""The path sandbox on real files: a table of hostile paths for read_file, write_file, list_dir (and edit, grep)
through run_tool, each refused with a clear message and nothing outside the root written; then resolve() and
read_text() on their own (caps, binaries, symlinks that stay inside)."""

import os
import socket
import time

import pytest

from deltamem.tools import ToolContext, ToolError, default_tools, resolve, run_tool
from deltamem.tools.sandbox import MAX_READ, read_text

SECRET = "top secret\n"
OUTSIDE = "outside the project root"
ABSOLUTE = "is an absolute path"
CONTROL = "contains a control character"
NOT_REGULAR = "not a regular file or directory"
BINARY = "is a binary file"


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    """tmp_path/outside/secret.txt, and tmp_path/root holding every kind of hostile entry."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "ok.txt").write_text("fine\n")
    (root / "link_file").symlink_to(outside / "secret.txt")
    (root / "link_dir").symlink_to(outside)
    (root / "dangling_out").symlink_to(outside / "not_yet.txt")
    (root / "dev_zero").symlink_to("/dev/zero")
    with open(root / "sparse", "wb") as f:
        f.truncate(2 * 1024**3)
    (root / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    os.mkfifo(root / "fifo")
    monkeypatch.chdir(root)  # a relative bind keeps the socket's path under the 108-byte limit
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    yield root, outside
    sock.close()


def snapshot(top):
    """Every entry under `top` (symlinks not followed) with its type, size, mtime and, for small files, bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            small_file = os.path.isfile(p) and not os.path.islink(p) and st.st_size < 1 << 20
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, open(p, "rb").read() if small_file else None)
    return out


W = {"content": "pwned\n"}
HOSTILE = [
    # read_file
    ("read_file", {"path": "../../etc/passwd"}, OUTSIDE),
    ("read_file", {"path": "/etc/passwd"}, ABSOLUTE),
    ("read_file", {"path": "{outside}/secret.txt"}, ABSOLUTE),
    ("read_file", {"path": "../outside/secret.txt"}, OUTSIDE),
    ("read_file", {"path": "link_file"}, OUTSIDE),
    ("read_file", {"path": "link_dir/secret.txt"}, OUTSIDE),
    ("read_file", {"path": "sub/../link_dir/secret.txt"}, OUTSIDE),
    ("read_file", {"path": "dev_zero"}, OUTSIDE),
    ("read_file", {"path": "sparse"}, BINARY),
    ("read_file", {"path": "binary.bin"}, BINARY),
    ("read_file", {"path": "latin1.txt"}, "not valid UTF-8"),
    ("read_file", {"path": "ok\0.txt"}, CONTROL),
    ("read_file", {"path": "ok.txt\n../../etc/passwd"}, CONTROL),
    ("read_file", {"path": "ok.txt\x1b[2J"}, CONTROL),
    ("read_file", {"path": "fifo"}, NOT_REGULAR),
    ("read_file", {"path": "sock"}, NOT_REGULAR),
    ("read_file", {"path": "sub"}, "is a directory"),
    ("read_file", {"path": "missing.txt"}, "no such file or directory"),
    # write_file
    ("write_file", {"path": "../escaped.txt", **W}, OUTSIDE),
    ("write_file", {"path": "../outside/secret.txt", **W}, OUTSIDE),
    ("write_file", {"path": "{outside}/new.txt", **W}, ABSOLUTE),
    ("write_file", {"path": "link_file", **W}, OUTSIDE),
    ("write_file", {"path": "link_dir/new.txt", **W}, OUTSIDE),
    ("write_file", {"path": "link_dir/deeper/new.txt", **W}, OUTSIDE),
    ("write_file", {"path": "dangling_out", **W}, OUTSIDE),
    ("write_file", {"path": "dev_zero", **W}, OUTSIDE),
    ("write_file", {"path": "fifo", **W}, NOT_REGULAR),
    ("write_file", {"path": "sock", **W}, NOT_REGULAR),
    ("write_file", {"path": "new\0.txt", **W}, CONTROL),
    ("write_file", {"path": "new\nfile.txt", **W}, CONTROL),
    ("write_file", {"path": "sub", **W}, "is a directory"),
    ("write_file", {"path": ".git/config", **W}, "inside .git"),
    ("write_file", {"path": ".git/hooks/pre-commit", **W}, "inside .git"),
    ("write_file", {"path": "sub/../.GIT/HEAD", **W}, "inside .git"),
    ("write_file", {"path": "ok.txt/child.txt", **W}, "is a file, not a directory"),
    # list_dir
    ("list_dir", {"path": "../.."}, OUTSIDE),
    ("list_dir", {"path": ".."}, OUTSIDE),
    ("list_dir", {"path": "/"}, ABSOLUTE),
    ("list_dir", {"path": "link_dir"}, OUTSIDE),
    ("list_dir", {"path": "dev_zero"}, OUTSIDE),
    ("list_dir", {"path": "fifo"}, NOT_REGULAR),
    ("list_dir", {"path": "sub\0"}, CONTROL),
    ("list_dir", {"path": "sub\n"}, CONTROL),
    ("list_dir", {"path": "sparse"}, "is a file, not a directory"),
    # edit and grep take paths the same way
    ("edit", {"path": "link_file", "old": "top", "new": "no"}, OUTSIDE),
    ("edit", {"path": ".git/config", "old": "core", "new": "x"}, "inside .git"),
    ("edit", {"path": "binary.bin", "old": "PNG", "new": "x"}, BINARY),
    ("grep", {"pattern": "secret", "path": "link_dir"}, OUTSIDE),
    ("grep", {"pattern": "secret", "path": "../outside"}, OUTSIDE),
    ("grep", {"pattern": ".", "path": "binary.bin"}, BINARY),
    ("grep", {"pattern": ".", "path": "fifo"}, NOT_REGULAR),
    ("glob", {"pattern": "../outside/*"}, "must stay inside the project root"),
    ("glob", {"pattern": "{outside}/*"}, "must stay inside the project root"),
]


@pytest.mark.parametrize(
    ("tool", "args", "message"), HOSTILE, ids=[f"{t}-{a.get('path', a.get('pattern'))!r}" for t, a, _ in HOSTILE]
)
def test_hostile_paths_are_refused(tree, tool, args, message):
    root, outside = tree
    args = {k: v.replace("{outside}", str(outside)) for k, v in args.items()}
    before = snapshot(root.parent)
    t0 = time.monotonic()
    ok, out = run_tool(ToolContext(root), default_tools(), tool, args)
    assert time.monotonic() - t0 < 5  # the sparse file, the FIFO and /dev/zero never block or load
    assert not ok
    assert out.startswith("error: ") and message in out, out
    assert SECRET not in out
    assert snapshot(root.parent) == before  # nothing written, inside the root or out of it
    assert (outside / "secret.txt").read_text() == SECRET


def test_resolve_allows_what_stays_inside(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.txt").write_text("fine\n")
    (root / "sub" / "to_ok").symlink_to("../ok.txt")
    (root / "sub_link").symlink_to("sub")
    real = root.resolve()
    assert resolve(root, "ok.txt") == real / "ok.txt"
    assert resolve(root, "sub/../ok.txt") == real / "ok.txt"
    assert resolve(root, "sub/to_ok") == real / "ok.txt"  # a symlink that stays inside is followed
    assert resolve(root, "sub_link/to_ok") == real / "ok.txt"
    assert resolve(root, ".") == real
    assert resolve(root, "new/dir/file.txt", must_exist=False) == real / "new" / "dir" / "file.txt"
    assert resolve(root, ".git/config", must_exist=False) == real / ".git" / "config"  # reading .git is fine
    linked_root = tmp_path / "root_link"  # the root itself may be reached through a symlink
    linked_root.symlink_to(root)
    assert resolve(linked_root, "sub/to_ok") == real / "ok.txt"


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        ("missing.txt", {}, "no such file or directory: 'missing.txt'"),
        ("sub", {"allow_dir": False}, "'sub' is a directory, not a file"),
        (".git/x", {"must_exist": False, "write": True}, "inside .git"),
        ("a\tb", {}, CONTROL),
        ("../root/../../x", {"must_exist": False}, OUTSIDE),
    ],
)
def test_resolve_refusals(tmp_path, path, kwargs, message):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    with pytest.raises(ToolError, match=message):
        resolve(root, path, **kwargs)


def test_read_is_capped_at_whole_lines(tmp_path):
    line = "0123456789abcdef " * 6 + "\n"  # 103 bytes
    path = tmp_path / "big.txt"
    path.write_text(line * (3 * MAX_READ // len(line)))
    t0 = time.monotonic()
    text, truncated = read_text(path, "big.txt")
    assert time.monotonic() - t0 < 2
    assert truncated and text.endswith("\n") and len(text) <= MAX_READ
    assert len(text) == MAX_READ // len(line) * len(line)  # the partial last line is dropped
    assert set(text.splitlines()) == {line[:-1]}


def test_read_cut_inside_a_multibyte_character(tmp_path):
    path = tmp_path / "accents.txt"
    path.write_bytes(b"a" + "é".encode() * MAX_READ)  # no newline; the cap falls inside an 'é'
    text, truncated = read_text(path, "accents.txt")
    assert truncated and text == "a" + "é" * ((MAX_READ - 1) // 2)


def test_read_small_file_whole(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("naïve\nline two")
    assert read_text(path, "small.txt") == ("naïve\nline two", False)

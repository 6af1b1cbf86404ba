"""The path sandbox: every path a tool gets from the model goes through `resolve`, every file it reads through
`read_text`.

`resolve` refuses absolute paths, control characters in names, anything that resolves (symlinks followed,
parent directories included) outside the project root, anything that is neither a regular file nor a directory
(devices, FIFOs, sockets), and writes into `.git`. `read_text` reads at most MAX_READ bytes and refuses binary
files. The sandbox guards against what the model asks for; it does not defend against another process swapping
files under the root while a tool runs.
"""

from __future__ import annotations

import codecs
import os
import stat
import unicodedata
from pathlib import Path

from deltamem.tools.base import ToolError
from deltamem.tools.documents import READ_CONVERTED

MAX_READ = 1024 * 1024  # bytes read from one file per call
BINARY_PROBE = 8192  # a NUL byte in this many leading bytes marks a binary file


def has_control_chars(name: str) -> bool:
    """True if `name` holds a NUL, newline, tab or any other control character (Unicode category Cc)."""
    return any(unicodedata.category(c) == "Cc" for c in name)


def resolve(root: Path, path: str, *, must_exist: bool = True, allow_dir: bool = True, write: bool = False) -> Path:
    """The absolute, symlink-free path of `path` (relative to `root`), or ToolError saying why it is refused.

    must_exist: the path must exist. allow_dir: it may be a directory. write: it is about to be written, so it may
    not lie inside a `.git` directory."""
    if not isinstance(path, str):
        raise ToolError(f"a path must be a string, got {type(path).__name__}")
    if has_control_chars(path):
        raise ToolError(f"refused: the path {path!r} contains a control character (NUL, newline, ...)")
    if Path(path).is_absolute():
        raise ToolError(f"refused: {path!r} is an absolute path; paths are relative to the project root")
    base = Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise ToolError(f"refused: {path!r} is outside the project root (after following '..' and symlinks)")
    if write and ".git" in (part.lower() for part in target.relative_to(base).parts):
        raise ToolError(f"refused: {path!r} is inside .git; git's internals are not written by tools")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        if must_exist:
            raise ToolError(f"no such file or directory: {path!r}") from None
        return target
    except NotADirectoryError:
        raise ToolError(f"{path!r}: a parent of it is a file, not a directory") from None
    if stat.S_ISDIR(mode):
        if not allow_dir:
            raise ToolError(f"{path!r} is a directory, not a file")
    elif not stat.S_ISREG(mode):
        raise ToolError(f"refused: {path!r} is not a regular file or directory (a device, FIFO or socket)")
    return target



def read_text(path: Path, name: str, limit: int = MAX_READ) -> tuple[str, bool]:
    """The UTF-8 text of the regular file `path` (already resolved) and whether it was cut at `limit` bytes (then
    it ends at the last whole line read). Binary files (a NUL byte in the first 8 KB, or not UTF-8) are refused
    with a ToolError naming the file as `name`. PDF, DOCX, PPTX, XLSX and e-mail files are read as their converted
    text (tools/documents.py), with its page / slide / sheet / message anchors."""
    if path.suffix.lower() in READ_CONVERTED:
        return _document_text(path, name, limit)
    # O_NONBLOCK: a FIFO swapped in since resolve() cannot block the open; O_NOFOLLOW: nor can a new symlink
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolError(f"refused: {name!r} is not a regular file")
        data = f.read(limit + 1)
    truncated = len(data) > limit
    data = data[:limit]
    if b"\0" in data[:BINARY_PROBE]:
        raise ToolError(f"{name!r} is a binary file (it has NUL bytes); not shown")
    try:  # a cut file may end inside a multi-byte character: the incremental decoder leaves that out
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError as e:
        raise ToolError(f"{name!r} is a binary file (not valid UTF-8 at byte {e.start}); not shown") from None
    if truncated and "\n" in text:
        text = text[: text.rindex("\n") + 1]
    return text, truncated


def _document_text(path: Path, name: str, limit: int) -> tuple[str, bool]:
    from deltamem.tools.documents import DocumentError, convert

    if path.is_symlink() or not path.is_file():
        raise ToolError(f"refused: {name!r} is not a regular file")
    try:
        text = convert(path)
    except DocumentError as e:
        raise ToolError(f"{name!r}: {e}") from None
    data = text.encode()
    if len(data) <= limit:
        return text, False
    text = data[:limit].decode("utf-8", "ignore")
    return text[: text.rindex("\n") + 1] if "\n" in text else text, True


def split_lines(text: str) -> list[str]:
    """Lines as grep and editors count them: split at "\\n", a trailing "\\r" dropped, no empty last line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]

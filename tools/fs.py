"""File tools: list_dir, read_file, grep, glob (read-only) and write_file, edit (risky). Every path goes through
the sandbox (tools.sandbox); grep and glob see the files .gitignore keeps (tools.files.project_files)."""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import tempfile
from pathlib import Path

from deltamem.tools import rank
from deltamem.tools.base import MAX_PATH_ARG, MAX_PATTERN_ARG, Tool, ToolContext, ToolError, kwargs_runner
from deltamem.tools.documents import READ_CONVERTED
from deltamem.tools.files import project_files
from deltamem.tools.repomap import repo_map
from deltamem.tools.sandbox import MAX_READ, has_control_chars, read_text, resolve, split_lines

MAX_ENTRIES = 500  # list_dir entries and glob files shown
MAX_MATCHES = 200  # grep result lines shown
MAX_LINE = 300  # characters of a matching line grep shows


def repo_map_tool(ctx: ToolContext, path: str = ".", max_tokens: int = 1500) -> str:
    """The repository map (tools/repomap.py) of the project or of one directory of it."""
    if not 100 <= max_tokens <= 20_000:
        raise ToolError(f"max_tokens must be between 100 and 20000, got {max_tokens}")
    root = ctx.root.resolve()
    target = resolve(root, path)
    if not target.is_dir():
        raise ToolError(f"{path!r} is a file, not a directory (use read_file)")
    under = target.relative_to(root)
    files = []
    for rel in project_files(root, max_bytes=MAX_READ):
        if under == Path(".") or under in rel.parents:
            try:
                text, _ = read_text(root / rel, rel.as_posix())
            except (ToolError, OSError):
                text = ""  # listed, without definitions
            files.append((rel.as_posix(), text))
    return repo_map(files, max_tokens) or "(no files)"


def _schema(required: list[str], **properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": required}


def _more(shown: int, total: int, what: str) -> str:
    return f"\n[... {total - shown:,} more {what}]" if total > shown else ""


def list_dir(ctx: ToolContext, path: str = ".") -> str:
    target = resolve(ctx.root, path)
    if not target.is_dir():
        raise ToolError(f"{path!r} is a file, not a directory (use read_file)")
    entries = []
    with os.scandir(target) as it:
        for entry in it:
            if entry.name == ".git":
                continue
            name = repr(entry.name) if has_control_chars(entry.name) else entry.name
            entries.append(name + "/" if entry.is_dir() else name)
    if not entries:
        return "(empty directory)"
    entries.sort()
    return "\n".join(entries[:MAX_ENTRIES]) + _more(MAX_ENTRIES, len(entries), "entries")


def read_file(ctx: ToolContext, path: str, start_line: int = 1, end_line: int | None = None) -> str:
    if start_line < 1:
        raise ToolError(f"start_line must be >= 1, got {start_line}")
    if end_line is not None and end_line < start_line:
        raise ToolError(f"end_line ({end_line}) is before start_line ({start_line})")
    target = resolve(ctx.root, path, allow_dir=False)
    text, truncated = read_text(target, path)
    lines = split_lines(text)
    if not lines and start_line == 1:
        return "(empty file)"
    if start_line > len(lines):
        if truncated:
            raise ToolError(f"line {start_line} of {path!r} is past the first {MAX_READ:,} bytes, all read_file reads")
        raise ToolError(f"start_line {start_line} is past the end of {path!r} ({len(lines)} lines)")
    end = len(lines) if end_line is None else min(end_line, len(lines))
    out = "\n".join(f"{n:5d}| {lines[n - 1]}" for n in range(start_line, end + 1))
    if truncated and end == len(lines):
        size = target.stat().st_size
        out += f"\n[... {path} is {size:,} bytes; read_file reads only the first {MAX_READ:,}]"
    return out


def _matches_glob(root: Path, pattern: str) -> set[Path]:
    """Paths (relative to root) that pathlib's glob finds for `pattern`, refused if it could leave the root."""
    if not pattern or has_control_chars(pattern):
        raise ToolError(f"bad glob pattern {pattern!r}")
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise ToolError(f"refused: the glob {pattern!r} must stay inside the project root (no absolute path, no '..')")
    try:
        return {p.relative_to(root) for p in root.glob(pattern)}
    except ValueError as e:
        raise ToolError(f"bad glob pattern {pattern!r}: {e}") from None


def glob_files(ctx: ToolContext, pattern: str) -> str:
    root = ctx.root.resolve()
    found = sorted(_matches_glob(root, pattern) & set(project_files(root)))
    if not found:
        return f"no files match {pattern!r}"
    return "\n".join(p.as_posix() for p in found[:MAX_ENTRIES]) + _more(MAX_ENTRIES, len(found), "files")


# tools/documents.py's anchors: pages, slides, messages, headings
_ANCHOR = re.compile(r"\[(page|slide|message) \d+\]$|#{1,6} \S")


def search_pattern(pattern: str, ignore_case: bool | None = None) -> re.Pattern:
    """The regular expression grep searches with. Smart case (ripgrep's): case-insensitive unless the pattern has an
    upper-case letter (escapes such as \\S aside); and a literal space matches any run of whitespace (converted PDFs
    keep justified text's doubled spaces, code its alignment), except where a quantifier follows it."""
    out, upper, i, in_class = [], False, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        upper |= c.isupper()
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "^":
                out.append("[^")
                i += 2
            else:
                out.append("[")
                i += 1
            if pattern[i : i + 1] == "]":  # a leading ] is a literal inside the class
                out.append("]")
                i += 1
            continue
        elif c == " ":
            j = i
            while j < len(pattern) and pattern[j] == " ":
                j += 1
            if j == len(pattern) or pattern[j] not in "*+?{":
                out.append(r"\s+")
                i = j
                continue
        out.append(c)
        i += 1
    flags = re.IGNORECASE if (not upper if ignore_case is None else ignore_case) else 0
    try:
        return re.compile("".join(out), flags)
    except re.error:  # the rewriting cannot make a valid pattern invalid, but leave the original's message
        try:
            return re.compile(pattern, flags)
        except re.error as e:
            raise ToolError(f"bad regular expression {pattern!r}: {e}") from None


def _searched(ctx: ToolContext, path: str, glob: str | None) -> tuple[Path, list[Path], bool]:
    """(root, the files a search of `path` reads, whether path is a directory)."""
    root = ctx.root.resolve()
    target = resolve(root, path)
    if not target.is_dir():
        return root, [target.relative_to(root)], False
    under = target.relative_to(root)
    files = [f for f in project_files(root) if under in f.parents]
    if glob is not None:
        if "/" in glob:
            files = sorted(set(files) & _matches_glob(root, glob))
        else:
            files = [f for f in files if fnmatch.fnmatchcase(f.name, glob)]
    return root, files, True


def grep(ctx: ToolContext, pattern: str, path: str = ".", glob: str | None = None) -> str:
    rx = search_pattern(pattern)
    root, files, in_dir = _searched(ctx, path, glob)
    out, skipped = _search(root, files, rx, in_dir, path)
    if out:
        return _shown(out, skipped)
    # Nothing: say what a looser search finds, so that a small model reads the answer instead of inventing one
    if not rx.flags & re.IGNORECASE:  # capitals made it case-sensitive
        loose, _ = _search(root, files, search_pattern(pattern, ignore_case=True), in_dir, path)
        if loose:
            head = f"no matches for {pattern!r} (case-sensitive: it has capitals); ignoring case:"
            return head + "\n" + _shown(loose, skipped)
    words = rank.words(pattern)
    ranked, _ = _ranked(root, files, words, in_dir, path)  # the pattern's words, wherever most of them are
    if ranked:
        head = f"no matches for {pattern!r}; the lines with most of its words ({', '.join(words)}):\n"
        return head + _best(ranked, skipped)
    return f"no matches for {pattern!r}" + (_skipped(skipped) if skipped else "")


def search(ctx: ToolContext, query: str, path: str = ".", glob: str | None = None) -> str:
    """The lines that best match the query's words (tools/rank.py), best first."""
    terms = rank.words(query)
    if not terms:
        raise ToolError(f"no words to search for in {query!r} (give the words a passage would use)")
    root, files, in_dir = _searched(ctx, path, glob)
    lines, skipped = _ranked(root, files, terms, in_dir, path)
    if not lines:
        need = "any line with" if len(terms) == 1 else "any line with two of"
        found = f"no match for {query!r}: {need} the words {', '.join(terms)} (word forms included)"
        return found + (_skipped(skipped) if skipped else "")
    return f"the lines best matching {', '.join(terms)}, best first:\n" + _best(lines, skipped)


def _best(lines: list[str], skipped: int) -> str:
    """Ranked lines as grep shows matches, the best one again last, as an answer cites it."""
    return _shown(lines, skipped) + f"\n(best match: {_cited(lines[0])})"


def _ranked(root: Path, files: list[Path], terms: list[str], in_dir: bool, path: str) -> tuple[list[str], int]:
    """The lines of `files` that best match `terms` (tools/rank.py: BM25, word stems, two terms a line where two
    or more are given): so a pattern shaped for another language (`def f` for a JavaScript function) shows f's
    lines, and a phrase with a word the text does not use, or uses in another form, still finds its passage; with
    the number of files that could not be read."""
    lines, skipped = _search(root, files, re.compile(""), in_dir, path, limit=None)
    return rank.ranked(lines, terms), skipped


def _cited(hit: str) -> str:
    """A result line 'path:N: [anchor] text' as an answer cites it: 'path, anchor: text' (else 'path, line N')."""
    path, n, text = hit.split(":", 2)
    text = text.strip()
    anchor = f"line {n}"
    if text.startswith("[") and "] " in text:
        anchor, text = text[1:].split("] ", 1)
    return f"{path}, {anchor}: {text}"


def _shown(out: list[str], skipped: int) -> str:
    """Matches as 'path:line: text'; where they are in several files, a first line lists those files."""
    paths = list(dict.fromkeys(line.split(":", 1)[0] for line in out[:MAX_MATCHES]))
    result = f"{len(paths)} files: {', '.join(paths)}\n" if len(paths) > 1 else ""
    result += "\n".join(out[:MAX_MATCHES])
    if len(out) > MAX_MATCHES:
        result += f"\n[... stopped after {MAX_MATCHES} matches; narrow the pattern, path or glob]"
    return result + (_skipped(skipped) if skipped else "")


def _skipped(n: int) -> str:
    return f"\n(skipped {n} binary, unreadable or over-{MAX_READ:,}-byte file(s))"


def _search(root: Path, files: list[Path], rx: re.Pattern, in_dir: bool, path: str,
            limit: int | None = MAX_MATCHES) -> tuple[list[str], int]:
    """Matching lines as 'path:line: [anchor] text' (more than `limit`: the first limit + 1) and the number of
    files skipped."""
    out, skipped = [], 0
    for rel in files:
        try:
            if in_dir and (root / rel).stat().st_size > MAX_READ:
                skipped += 1
                continue
            text, truncated = read_text(root / rel, rel.as_posix())
        except (ToolError, OSError):
            if not in_dir:
                raise
            skipped += 1
            continue
        if truncated:  # only an explicitly named file gets here, or one that grew since its stat
            if not in_dir:
                raise ToolError(f"{path!r} is over {MAX_READ:,} bytes, the most grep reads from one file")
            skipped += 1
            continue
        document = rel.suffix.lower() in READ_CONVERTED  # read converted: a match names its page, section, message
        heading = "sheet " if rel.suffix.lower() in (".xlsx", ".xls") else "section "  # as an answer cites it
        page = section = ""
        for n, line in enumerate(split_lines(text), 1):
            if document and _ANCHOR.match(line):
                if line.startswith("["):
                    page, section = line.strip()[1:-1], ""
                else:
                    section = heading + line.lstrip("#").strip()
            if rx.search(line):
                shown = line if len(line) <= MAX_LINE else line[:MAX_LINE] + " [...]"
                anchor = ", ".join(filter(None, (page, section)))
                out.append(f"{rel.as_posix()}:{n}: {f'[{anchor}] ' if anchor else ''}{shown}")
                if limit is not None and len(out) > limit:
                    break
        if limit is not None and len(out) > limit:
            break
    return out, skipped


def _write_atomic(target: Path, text: str, name: str) -> None:
    """Write `text` to `target` by a temp file in its directory renamed over it (keeping an existing file's mode)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise ToolError(f"cannot write {name!r}: {e.strerror}") from None
    try:
        with open(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fchmod(fd, mode)
            os.fsync(fd)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file(ctx: ToolContext, path: str, content: str) -> str:
    target = resolve(ctx.root, path, must_exist=False, allow_dir=False, write=True)
    existed = target.exists()
    _write_atomic(target, content, path)
    verb = "overwrote" if existed else "created"
    return f"{verb} {path} ({len(content.encode('utf-8')):,} bytes, {len(split_lines(content))} lines)"


def _occurrences(text: str, sub: str) -> list[int]:
    """Start offsets of every occurrence of `sub` in `text`, overlapping ones included."""
    found, i = [], text.find(sub)
    while i != -1:
        found.append(i)
        i = text.find(sub, i + 1)
    return found


def edit(ctx: ToolContext, path: str, old: str, new: str) -> str:
    if not old:
        raise ToolError("old must not be empty")
    target = resolve(ctx.root, path, allow_dir=False, write=True)
    if target.suffix.lower() in READ_CONVERTED:
        raise ToolError(f"{path!r} is read as its converted text, which cannot be written back into it: not edited")
    text, truncated = read_text(target, path)
    if truncated:
        raise ToolError(f"{path!r} is over {MAX_READ:,} bytes, the most edit reads; use write_file or shell")
    at = _occurrences(text, old)
    if len(at) != 1:
        if not at:
            raise ToolError(f"old text not found in {path!r} (it must match exactly, whitespace included)")
        raise ToolError(f"old text occurs {len(at)} times in {path!r}; it must occur exactly once (add context)")
    _write_atomic(target, text[: at[0]] + new + text[at[0] + len(old) :], path)
    line = text.count("\n", 0, at[0]) + 1
    return f"edited {path}: replaced the occurrence at line {line}"


_PATH = {"type": "string", "description": "path relative to the project root", "maxLength": MAX_PATH_ARG}
_WHERE = {  # what grep and search read
    "path": {**_PATH, "description": "file or directory to search", "default": "."},
    "glob": {"type": "string", "description": "only files whose name matches, e.g. '*.py' (with '/': path glob)",
             "maxLength": MAX_PATTERN_ARG},
}

TOOLS = (
    Tool(
        "list_dir",
        "List a directory of the project: one entry per line, directories ending in '/'.",
        _schema([], path={**_PATH, "default": "."}),
        False,
        kwargs_runner(list_dir),
    ),
    Tool(
        "read_file",
        "Read a text file with numbered lines ('   12| text'), optionally only lines start_line..end_line.",
        _schema(
            ["path"],
            path=_PATH,
            start_line={"type": "integer", "description": "first line to show, from 1", "default": 1},
            end_line={"type": "integer", "description": "last line to show (default: the end of the file)"},
        ),
        False,
        kwargs_runner(read_file),
    ),
    Tool(
        "grep",
        "Search the project's text files and documents (those .gitignore keeps) for a Python regular expression, "
        "line by line; case-insensitive unless the pattern has a capital, a space matches any whitespace; results "
        "are 'path:line: text' (documents: '[page N]', '[section HEADING]' or '[sheet NAME]' before the text).",
        _schema(
            ["pattern"],
            pattern={"type": "string", "description": "Python regular expression", "maxLength": MAX_PATTERN_ARG},
            **_WHERE,
        ),
        False,
        kwargs_runner(grep),
    ),
    Tool(
        "search",
        "Find the lines of the project's files and documents that best match some words, best first (ranked; word "
        "forms match: 'approved' finds 'approval'); for a question in words, where grep needs the exact text.",
        _schema(
            ["query"],
            query={"type": "string", "description": "the words to look for", "maxLength": MAX_PATTERN_ARG},
            **_WHERE,
        ),
        False,
        kwargs_runner(search),
    ),
    Tool(
        "map",
        "Map of the project (or of one directory): its files with their top-level definitions (classes, functions, "
        "types and their signatures), to find where something is defined.",
        _schema(
            [],
            path={**_PATH, "description": "directory to map", "default": "."},
            max_tokens={"type": "integer", "description": "size budget, 100-20000", "default": 1500},
        ),
        False,
        kwargs_runner(repo_map_tool),
    ),
    Tool(
        "glob",
        "List the project's files (those .gitignore keeps) matching a glob relative to the root, e.g. '**/*.py'.",
        _schema(["pattern"], pattern={"type": "string", "description": "glob pattern, '**' for any directories",
                                      "maxLength": MAX_PATTERN_ARG}),
        False,
        kwargs_runner(glob_files),
    ),
    Tool(
        "write_file",
        "Create or overwrite a text file with the given content (parent directories are created).",
        _schema(["path", "content"], path=_PATH, content={"type": "string", "description": "the whole new text"}),
        True,
        kwargs_runner(write_file),
    ),
    Tool(
        "edit",
        "Replace one exact occurrence of `old` in a file by `new`; `old` must occur exactly once in the file.",
        _schema(
            ["path", "old", "new"],
            path=_PATH,
            old={"type": "string", "description": "text to replace, exactly as in the file"},
            new={"type": "string", "description": "replacement text"},
        ),
        True,
        kwargs_runner(edit),
    ),
)

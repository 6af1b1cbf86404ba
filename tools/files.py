"""The project's files as git would show them: `project_files` lists the files under a root, leaving out what
.gitignore excludes. Used by grep and glob, and by ingest.

Inside a git work tree the list comes from `git ls-files -co --exclude-standard` (tracked files plus untracked
ones not ignored, every .gitignore level applied). Elsewhere (or without git) the tree is walked and the root's
.gitignore is applied with `pathspec`. Either way `.git`, symlinks (their targets are listed where they live, or
lie outside the root), non-regular files and names with control characters are left out.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pathspec

from deltamem.tools.base import ToolError
from deltamem.tools.sandbox import has_control_chars

GIT_TIMEOUT = 60.0  # seconds for git ls-files


def project_files(root: Path, max_bytes: int | None = None) -> list[Path]:
    """Regular files under `root` that .gitignore keeps, as sorted paths relative to `root`; with `max_bytes`,
    only those of at most that size."""
    root = Path(root).resolve()
    names = _git_files(root)
    if names is None:
        names = _walk_files(root)
    keep = []
    for name in set(names):
        rel = Path(name)
        if has_control_chars(name) or ".git" in rel.parts:
            continue
        try:
            st = os.lstat(root / rel)
        except OSError:  # listed by git but deleted from the work tree
            continue
        if stat.S_ISREG(st.st_mode) and (max_bytes is None or st.st_size <= max_bytes):
            keep.append(rel)
    return sorted(keep)


def _git_files(root: Path) -> list[str] | None:
    """Paths from `git ls-files`, or None when git is missing or `root` is not in a git work tree."""
    try:
        proc = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            timeout=GIT_TIMEOUT,
        )
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        raise ToolError(f"git ls-files took over {GIT_TIMEOUT:g} s listing the project's files") from None
    if proc.returncode != 0:
        return None
    return [name for name in os.fsdecode(proc.stdout).split("\0") if name]


def _walk_files(root: Path) -> list[str]:
    """Paths of files under `root` that its .gitignore does not exclude (ignored directories are not entered)."""
    try:
        lines = (root / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        prefix = "" if rel_dir == Path(".") else rel_dir.as_posix() + "/"
        dirnames[:] = [d for d in dirnames if d != ".git" and not spec.match_file(f"{prefix}{d}/")]
        names.extend(f"{prefix}{f}" for f in filenames if not spec.match_file(f"{prefix}{f}"))
    return names

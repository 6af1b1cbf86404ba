"""Real git repositories for tests: files written, added and committed with the git command."""

import subprocess
from pathlib import Path


def git_repo(root: Path, files: dict[str, str]) -> Path:
    """A committed git repository at `root` holding `files` (relative path -> text)."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    return root

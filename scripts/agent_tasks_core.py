"""What scripts/agent_tasks.py's tasks are and how they are checked: a Task (its question, the tool calls that answer
it, what the answer must name), `exact` (is an answer right), and the check of a task against the real tools on the
real tree."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deltamem.tools import ToolContext, default_tools, run_tool

KINDS = ("where", "returns", "uses", "value", "raises", "document")


@dataclass
class Task:
    kind: str
    question: str
    calls: list[tuple[str, dict]]  # the tool calls that answer it, in order
    expect: list[list[str]]
    facts: dict = field(default_factory=dict)  # what the ideal answer is written from
    results: list[tuple[bool, str]] = field(default_factory=list)  # the calls' real results, once checked

    def answer(self) -> str:
        """The ideal final answer (training traces), citing the path."""
        f = self.facts
        if self.kind == "where":
            return f"`{f['name']}` is defined in `{f['path']}` (line {f['line']})."
        if self.kind == "returns":
            return f"`{f['name']}` returns `{f['type']}` (defined in `{f['path']}`, line {f['line']})."
        if self.kind == "uses":
            paths = [f"`{p}`" for p in f["paths"]]
            listed = ", ".join(paths[:-1]) + " and " + paths[-1]
            return f"`{f['name']}` is used in {len(paths)} files: {listed}."
        if self.kind == "value":
            return f"`{f['name']}` is set to `{f['value']}` in `{f['path']}` (line {f['line']})."
        if self.kind == "raises":
            return f"`{f['name']}` raises `{f['exception']}` (defined in `{f['path']}`, line {f['line']})."
        where = f"`{f['path']}`, {f['anchor']}" if f["anchor"] else f"`{f['path']}`"  # an e-mail has one part
        return f"{where}: {f['sentence']}"


def _norm(s: str) -> str:
    """Lower case, quotes and backticks as spaces, no spaces inside brackets or after commas, single spaces."""
    s = re.sub(r"[`'\"]", " ", s.lower())
    s = re.sub(r"\s*([,\[\]()])\s*", r"\1", s)
    return re.sub(r"\s+", " ", s).strip()


def exact(task: Task | list[list[str]], answer: str) -> bool:
    """Each group of the task's expect has a member in the answer, as a whole token: `str` is not found in
    `string`, nor `1` in `10` (compared without case, spaces, quotes and backticks)."""
    a = _norm(answer)
    expect = task.expect if isinstance(task, Task) else task
    return all(any(_whole(_norm(x), a) for x in group) for group in expect)


def _whole(x: str, a: str) -> bool:
    """x in a, not inside a longer word: bounded where x begins or ends with a word character ('[a-z]' has no
    word edge to respect, and _norm glues brackets to their neighbours)."""
    before = "(?<![a-z0-9_])" if x[:1].isalnum() or x[:1] == "_" else ""
    after = "(?![a-z0-9_])" if x[-1:].isalnum() or x[-1:] == "_" else ""
    return re.search(before + re.escape(x) + after, a) is not None


def grep_count(files: list[tuple[str, str]], pattern: str) -> tuple[int, Counter]:
    rx = re.compile(pattern)
    per = Counter()
    for path, text in files:
        for line in text.splitlines():
            if rx.search(line):
                per[path] += 1
    return sum(per.values()), per


def consistent(root: Path, task: Task) -> bool:
    """The real tool, run on the real tree, shows everything the answer states (its results kept on the task)."""
    task.results = run_calls(root, task)
    result = task.results[-1][1]
    return all(any(x in result for x in group) for group in task.expect) and "truncated" not in result


def run_calls(root: Path, task: Task) -> list[tuple[bool, str]]:
    ctx, tools = ToolContext(root=root), default_tools()
    return [run_tool(ctx, tools, name, args) for name, args in task.calls]

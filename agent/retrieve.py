"""Look-up before the first reply: the task's names and key words searched with the agent's own tools, so that a small
model starts from the lines that answer it (as aider's repository map and Continue's codebase retrieval give a model
its context) and answers by reading and citing; it may still call tools.

    calls = lookup_calls(root, "Where is the function `parse_args` defined?")
    # [("definition", {"name": "parse_args"})]

A name is a word of the task (in backticks or not) that the project's code defines (tools/symbols.py), those shaped
like code (backticks, snake_case, camelCase, dotted) first: each gets `references` where the task asks where it is
used (called, imported...), else `definition`: one result, the one the question needs, nearest the reply. A task
without such a name gets `grep` over its key words (two or more), whose ranked fallback (tools/fs.py) shows the lines
holding most of them, with their page, section or message in documents. The runner (agent/runner.py) runs these calls
through run_tool and places them in the conversation as a tool-call turn marked `auto`, before the model's first
reply.
"""

from __future__ import annotations

import re
from pathlib import Path

from deltamem.tools.symbols import find_definitions

MAX_NAMES = 2  # names looked up per task
_TOKEN = re.compile(r"`([^`\n]{1,120})`|([A-Za-z_$][\w$]*(?:(?:\.|::)[A-Za-z_$][\w$]*)*)")
_CODE_SHAPED = re.compile(r".*(_|[a-z][A-Z]|[.:$]|\d).*|[A-Z]{2,}")
_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*")  # words, hyphenated ones whole (Meadow-4, C-5053)
# words of a question that name nothing in the sources: English function words and the words tasks are asked in
STOP = set("""
a an the and or not of in on at to for from by with as is are was were be been it its this that these those there
what which who whom whose where when why how do does did done can could should would will shall may might must
i me my we our you your he she they them their please tell show find give given list name cite say said
file document page section folder case project repository code module function class method constant variable
defined define definition state stated mention mentioned
""".split())

# words that ask where a name is used rather than what it is
USE = set("""
use uses used using user users usage refer refers referred referring reference references referenced call calls
called caller callers calling import imports imported importing depend depends depending
""".split())


def _stop(word: str) -> bool:
    w = word.lower()
    return w in STOP or (w.endswith("s") and w[:-1] in STOP)


def _candidates(task: str) -> list[tuple[str, bool]]:
    """(name, shaped like code) for each distinct name-like word of the task, in order."""
    out: dict[str, bool] = {}
    for quoted, bare in _TOKEN.findall(task):
        word = (quoted or bare).strip().strip("()")
        if not re.fullmatch(r"[A-Za-z_$][\w$]*(?:(?:\.|::)[A-Za-z_$][\w$]*)*", word):
            continue
        short = re.split(r"\.|::", word)[-1]
        if _stop(short) and not quoted:
            continue
        out[short] = out.get(short, False) or bool(quoted) or bool(_CODE_SHAPED.fullmatch(word))
    return list(out.items())


def key_words(task: str) -> list[str]:
    """The task's words that could name something: function words and question words dropped, in order."""
    return list(dict.fromkeys(w for w in _WORD.findall(task) if len(w) >= 2 and not _stop(w)))


def lookup_calls(root: Path, task: str) -> list[tuple[str, dict]]:
    """The tool calls to run before the model's first reply to `task` (see the module's docstring)."""
    candidates = _candidates(task)
    defined = {d.name for d in find_definitions(root, {c for c, _ in candidates})} if candidates else set()
    names = [c for c, shaped in candidates if c in defined and shaped]
    names += [c for c, shaped in candidates if c in defined and not shaped]
    if names:  # where a name is used, or else where it is defined (its signature, its value)
        tool = "references" if any(w.lower() in USE for w in re.findall(r"\w+", task)) else "definition"
        return [(tool, {"name": n}) for n in names[:MAX_NAMES]]
    words = key_words(task)  # one word ("hi", "thanks") is no phrase to look up
    return [("grep", {"pattern": " ".join(words[:8])})] if len(words) >= 2 else []

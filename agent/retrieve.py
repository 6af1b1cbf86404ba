"""Look-up before the first reply: the task's names and key words searched with the agent's own tools, so that a small
model starts from the lines that answer it (as aider's repository map and Continue's codebase retrieval give a model
its context) and answers by reading and citing; it may still call tools.

    calls = lookup_calls(root, "Where is the function `parse_args` defined?")
    # [("definition", {"name": "parse_args"})]

A name is a word of the task (in backticks or not) that the project's code defines (tools/symbols.py), those shaped
like code (backticks, snake_case, camelCase, dotted) first: each gets `references` where the task asks where it is
used (called, imported...), else `definition` (and, where the task asks what it raises or does, `read_file` of its
lines): the results the question needs, nearest the reply. A task without such a name gets `search` of its key
words (two or more: tools/rank.py's BM25 over word stems), which shows the lines holding most of them, with their
page, section or message in documents. The runner (agent/runner.py) runs these calls through run_tool and places
them in the conversation as a tool-call turn marked `auto`, before the model's first reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from deltamem.agent.parse import format_tool_call
from deltamem.tools import Tool, ToolContext, run_tool
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
defined define definition state stated mention mentioned value values set have has return returns returned
""".split())

# words that ask where a name is used rather than what it is
USE = set("""
use uses used using user users usage refer refers referred referring reference references referenced call calls
called caller callers calling import imports imported importing depend depends depending
""".split())

# words that ask about a definition's body: what it raises or throws, what it does
BODY = set("""
raise raises raised raising throw throws thrown throwing exception exceptions error errors panic panics fail fails
work works handle handles handled
""".split())


def _stop(word: str) -> bool:
    w = word.lower()
    return w in STOP or (w.endswith("s") and w[:-1] in STOP)


def _asks(word: str) -> bool:
    """A word the question is asked in (use, raise, error...): no name unless quoted, even where the code defines it
    (a `use` method, an `error` function)."""
    return _stop(word) or word.lower() in USE or word.lower() in BODY


def _candidates(task: str) -> list[tuple[str, bool]]:
    """(name, shaped like code) for each distinct name-like word of the task, in order."""
    out: dict[str, bool] = {}
    for quoted, bare in _TOKEN.findall(task):
        word = (quoted or bare).strip().strip("()")
        if not re.fullmatch(r"[A-Za-z_$][\w$]*(?:(?:\.|::)[A-Za-z_$][\w$]*)*", word):
            continue
        short = re.split(r"\.|::", word)[-1]
        if _asks(short) and not quoted:
            continue
        out[short] = out.get(short, False) or bool(quoted) or bool(_CODE_SHAPED.fullmatch(word))
    return list(out.items())


def key_words(task: str) -> list[str]:
    """The task's words that could name something: function words and question words dropped, in order."""
    return list(dict.fromkeys(w for w in _WORD.findall(task) if len(w) >= 2 and not _stop(w)))


def lookup_calls(root: Path, task: str) -> list[tuple[str, dict]]:
    """The tool calls to run before the model's first reply to `task` (see the module's docstring)."""
    candidates = _candidates(task)
    defs = find_definitions(root, {c for c, _ in candidates}) if candidates else []
    defined = {d.name for d in defs}
    names = [c for c, shaped in candidates if c in defined and shaped]
    names += [c for c, shaped in candidates if c in defined and not shaped]
    if names:  # where a name is used, or else where it is defined (its signature, its value)
        words = {w.lower() for w in re.findall(r"\w+", task)}
        if words & USE:
            return [("references", {"name": n}) for n in names[:MAX_NAMES]]
        calls = [("definition", {"name": n}) for n in names[:MAX_NAMES]]
        body = [d for d in defs if d.name == names[0]]
        if words & BODY and len(body) == 1 and body[0].end > body[0].line:  # what it raises, how it works
            d = body[0]
            calls.append(("read_file", {"path": d.path, "start_line": d.line, "end_line": min(d.end, d.line + 60)}))
        return calls
    words = key_words(task)  # one word ("hi", "thanks") is no phrase to look up
    return [("search", {"query": " ".join(words[:8])})] if len(words) >= 2 else []


def lookup_turn(
    ctx: ToolContext,
    tools: dict[str, Tool],
    task: str,
    syntax: str = "json",
    on_event: Callable[[dict], None] = lambda e: None,
) -> list[dict]:
    """The look-up as one tool-call turn before the first reply: an assistant message whose calls (those of
    lookup_calls that `tools` offers) are marked auto, since the runner writes it and not the model, then each
    call's real result, as the agent graph's tools node writes them; on_event sees each call as it runs."""
    todo = [(n, a) for n, a in lookup_calls(ctx.root, task) if n in tools]
    if not todo:
        return []
    calls, results = [], []
    for i, (name, args) in enumerate(todo):
        call = {"id": f"auto{i}", "name": name, "arguments": args, "auto": True}
        ok, result = run_tool(ctx, tools, name, args)
        on_event({"tool": name, "arguments": args, "ok": ok, "result": result, "auto": True})
        calls.append(call)
        results.append({"role": "tool", "content": f"[{name}] {result}", "ok": ok, "call": call})
    content = "\n".join(format_tool_call(n, a, syntax) for n, a in todo)
    return [{"role": "assistant", "content": content, "tool_calls": calls, "errors": [], "auto": True}, *results]

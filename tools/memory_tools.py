"""Memory tools: recall (full-text search of the session's turns and ingested files, plus this run's notes) and
note (a fact kept as a turn of role "note", saved with the run's turn, so later recall finds it)."""

from __future__ import annotations

import re

from deltamem.memory.errors import StoreError
from deltamem.tools.base import MAX_PATTERN_ARG, Tool, ToolContext, ToolError, kwargs_runner

MAX_RECALL = 50  # hits one recall may ask for


def _session(ctx: ToolContext) -> str:
    if ctx.store is None or ctx.session_id is None:
        raise ToolError("no memory store or session is attached to this agent, so there is nothing to recall or note")
    return ctx.session_id


def recall(ctx: ToolContext, query: str, limit: int = 5) -> str:
    sid = _session(ctx)
    if not query.strip():
        raise ToolError("query must not be empty")
    if not 1 <= limit <= MAX_RECALL:
        raise ToolError(f"limit must be between 1 and {MAX_RECALL}, got {limit}")
    try:
        hits = ctx.store.search(sid, query, limit)
    except StoreError as e:
        raise ToolError(str(e)) from None
    words = [w.lower() for w in re.findall(r"\w+", query) if w.upper() not in ("AND", "OR", "NOT")]
    lines = [f"this run's note: {t['text']}" for t in ctx.pending_turns if all(w in t["text"].lower() for w in words)]
    if not hits and not lines:
        return f"nothing found for {query!r}"
    for h in hits:
        snippet = " ".join(h["snippet"].split())  # one hit per line
        where = f"turn {h['seq']} ({h['role']})" if h["kind"] == "turn" else f"file {h['path']} (turn {h['seq']})"
        lines.append(f"{where}: {snippet}")
    return "\n".join(lines)


def note(ctx: ToolContext, text: str) -> str:
    """The note is kept in the context until the run saves its turn: it is committed with the run (one
    transaction), or dropped with it if the run fails."""
    _session(ctx)
    if not text.strip():
        raise ToolError("text must not be empty")
    ctx.pending_turns.append({"role": "note", "text": text})
    return "noted"


TOOLS = (
    Tool(
        "recall",
        "Search this session's memory (earlier turns, notes and ingested files) by full-text query; one hit per "
        "line with the matching words in [brackets].",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": 'words to find (SQLite FTS5 syntax: "a phrase", OR)',
                          "maxLength": MAX_PATTERN_ARG},
                "limit": {"type": "integer", "description": f"most hits, 1 to {MAX_RECALL}", "default": 5},
            },
            "required": ["query"],
        },
        False,
        kwargs_runner(recall),
    ),
    Tool(
        "note",
        "Save a short fact to this session's memory so that recall can find it later.",
        {"type": "object", "properties": {"text": {"type": "string", "description": "the fact"}}, "required": ["text"]},
        False,
        kwargs_runner(note),
    ),
)

"""Memory tools: recall (full-text search of the session's turns and ingested files) and note (store a fact as
a turn of role "note", so later recall finds it), both through the context's memory.store.Store."""

from __future__ import annotations

from memory.errors import StoreError
from tools.base import Tool, ToolContext, ToolError, kwargs_runner

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
    if not hits:
        return f"nothing found for {query!r}"
    lines = []
    for h in hits:
        snippet = " ".join(h["snippet"].split())  # one hit per line
        where = f"turn {h['seq']} ({h['role']})" if h["kind"] == "turn" else f"file {h['path']} (turn {h['seq']})"
        lines.append(f"{where}: {snippet}")
    return "\n".join(lines)


def note(ctx: ToolContext, text: str) -> str:
    sid = _session(ctx)
    if not text.strip():
        raise ToolError("text must not be empty")
    try:
        ctx.store.save_turn(sid, [{"role": "note", "text": text}])
    except StoreError as e:
        raise ToolError(str(e)) from None
    return "noted"


TOOLS = (
    Tool(
        "recall",
        "Search this session's memory (earlier turns, notes and ingested files) by full-text query; one hit per "
        "line with the matching words in [brackets].",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": 'words to find (SQLite FTS5 syntax: "a phrase", OR)'},
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

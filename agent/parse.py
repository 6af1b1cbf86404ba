"""Tool calls in model output: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes style).

`parse_tool_calls` never raises: whatever the model wrote, it returns the prose, the well-formed calls and one
error message per malformed block, which the agent hands back to the model so it can try again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.S)


@dataclass
class Parsed:
    content: str  # the text outside the tool-call blocks, stripped
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments": dict}
    errors: list[str] = field(default_factory=list)


def format_tool_call(name: str, arguments: dict) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def parse_tool_calls(text: str, id_prefix: str = "call") -> Parsed:
    out = Parsed(content="")
    try:
        prose = []
        pos = 0
        for m in _BLOCK.finditer(text):
            prose.append(text[pos : m.start()])
            pos = m.end()
            if not m.group(0).endswith(CLOSE):
                out.errors.append(f"a {OPEN} block was not closed with {CLOSE}")
                continue
            call, error = _one_call(m.group(1))
            if error:
                out.errors.append(error)
            else:
                call["id"] = f"{id_prefix}_{len(out.calls)}"
                out.calls.append(call)
        prose.append(text[pos:])
        out.content = "".join(prose).strip()
    except Exception as e:  # a parser must never take the agent loop down
        out.errors.append(f"could not parse the tool calls: {e}")
    return out


def _one_call(body: str) -> tuple[dict, str | None]:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:
        return {}, f'a tool call is not valid JSON ({e}); write {OPEN}{{"name": ..., "arguments": {{...}}}}{CLOSE}'
    if not isinstance(obj, dict):
        return {}, 'a tool call must be a JSON object with "name" and "arguments"'
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return {}, 'a tool call has no "name" string'
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except ValueError:
            return {}, f"the arguments of {name!r} are a string that is not JSON"
    if not isinstance(args, dict):
        return {}, f"the arguments of {name!r} must be a JSON object"
    return {"name": name, "arguments": args}, None

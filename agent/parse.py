"""Tool calls in model output, in either of the two syntaxes models are trained on, inside `<tool_call>` blocks:

- JSON (Hermes, Qwen2.5/3, SmolLM2): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- XML (Qwen3.5, Qwen3-Coder): `<tool_call><function=NAME><parameter=ARG>value</parameter>...</function></tool_call>`,
  where a value is written as is if it is a string, else as JSON (so a parameter's schema type decides).

A reply's last block may lack its CLOSE (the model ended the reply, or closed a code fence, where CLOSE was due): it
is read if it holds a whole call. `parse_tool_calls` reads both syntaxes and never raises: whatever the model wrote,
it returns the prose (after any `</think>`), the well-formed calls and one error message per malformed block, which
the agent hands back to the model so it can try again. `format_tool_call` writes a call in the syntax a model's chat
template uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_JSON = json.JSONDecoder()
_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(</function>|\Z)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)</parameter>", re.S)
THINK_END = "</think>"
CUT_OFF = "the tool call was cut off before it was complete, so it was not run; call the tool again, arguments short"
_FENCE_END = re.compile(r"\s*```\s*\Z")


@dataclass
class Parsed:
    content: str  # the text outside the tool-call blocks, stripped
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments": dict}
    errors: list[str] = field(default_factory=list)


def format_tool_call(name: str, arguments: dict, syntax: str = "json") -> str:
    if syntax == "xml":
        params = "".join(
            f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}\n</parameter>\n"
            for k, v in arguments.items()
        )
        return f"{OPEN}\n<function={name}>\n{params}</function>\n{CLOSE}"
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def parse_tool_calls(text: str, id_prefix: str = "call", schemas: dict[str, dict] | None = None) -> Parsed:
    """schemas: tool name -> its JSON-schema `parameters`, which types the XML form's values (a string parameter
    stays the text written; others are read as JSON)."""
    out = Parsed(content="")
    try:
        prose = []
        pos = 0
        for start, end, body, closed in _blocks(text):
            prose.append(text[pos:start])
            pos = end
            # An unclosed block can only be the reply's last: read it if what it holds is a whole call (the reply
            # ended, or a code fence closed it, where CLOSE was due), as vLLM's Hermes parser does
            body = body if closed else _FENCE_END.sub("", body)
            call, error = _xml_call(body, schemas or {}) if body.lstrip().startswith("<function=") else _one_call(body)
            if error and not closed:  # worded without the tags: a small model copies an error's text into its
                error = CUT_OFF  # next call's arguments
            if error:
                out.errors.append(error)
            else:
                call["id"] = f"{id_prefix}_{len(out.calls)}"
                out.calls.append(call)
        prose.append(text[pos:])
        content = "".join(prose)
        out.content = content.rsplit(THINK_END, 1)[-1].strip()  # a thinking model's reasoning is not the answer
    except Exception as e:  # a parser must never take the agent loop down
        out.errors.append(f"could not parse the tool calls: {e}")
    return out


def _blocks(text: str) -> Iterator[tuple[int, int, str, bool]]:
    """(start, end, body, closed) of each call block: from OPEN to the first CLOSE (or the text's end), except that
    a JSON body is read as JSON first, so a CLOSE inside one of its strings (a grep pattern, say) does not end it."""
    pos = 0
    while (start := text.find(OPEN, pos)) != -1:
        i = start + len(OPEN)
        j = len(text) - len(text[i:].lstrip())
        if text.startswith("{", j):
            try:
                after = _JSON.raw_decode(text, j)[1]
            except (ValueError, RecursionError):
                after = None
            if after is not None:
                k = len(text) - len(text[after:].lstrip())
                if text.startswith(CLOSE, k):
                    yield start, k + len(CLOSE), text[i:after], True
                    pos = k + len(CLOSE)
                    continue
        end = text.find(CLOSE, i)
        if end == -1:
            yield start, len(text), text[i:], False
            return
        yield start, end + len(CLOSE), text[i:end], True
        pos = end + len(CLOSE)


def _xml_call(body: str, schemas: dict[str, dict]) -> tuple[dict, str | None]:
    m = _FUNCTION.search(body)
    if m is None or not m.group(3):
        return {}, "a <function=NAME> block was not closed with </function>"
    name = m.group(1).strip()
    if not name:
        return {}, "a tool call has an empty <function=> name"
    if body[m.end() :].strip():
        return {}, f"text after </function> in the call of {name!r}; write one <function=...> per {OPEN} block"
    inner = m.group(2)
    if "<parameter=" in _PARAMETER.sub("", inner):
        return {}, f"a <parameter=NAME> block of {name!r} was not closed with </parameter>"
    props = (schemas.get(name) or {}).get("properties") or {}
    args: dict = {}
    for pm in _PARAMETER.finditer(inner):
        key, raw = pm.group(1).strip(), pm.group(2)
        raw = raw[1:] if raw.startswith("\n") else raw  # the template writes "\n" + value + "\n"
        raw = raw[:-1] if raw.endswith("\n") else raw
        args[key] = _typed(raw, (props.get(key) or {}).get("type"))
    return {"name": name, "arguments": args}, None


def _typed(raw: str, kind) -> object:
    """A parameter value as its schema types it: strings (and untyped parameters) as written, others as JSON."""
    if kind in (None, "string") or (isinstance(kind, list) and "string" in kind):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw  # the tool's own checks report a bad value


def _one_call(body: str) -> tuple[dict, str | None]:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:
        return {}, f'a tool call is not valid JSON ({e}); write one JSON object with "name" and "arguments"'
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

"""The tool interface: `Tool` (what the model sees and what runs), `ToolContext` (where it runs), `ToolError`, and
`run_tool`, the one entry point the agent calls, which checks the arguments, never raises and caps the output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltamem.memory.store import Store


class ToolError(Exception):
    """A failure the model can act on; its message is shown to the model as is ("no such file: x")."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str  # one or two sentences for the model
    parameters: dict  # JSON schema of the arguments: {"type": "object", "properties": {...}, "required": [...]}
    risky: bool  # True where the agent asks the user before running it (it writes files or runs commands)
    run: Callable[[ToolContext, dict], str]


@dataclass
class ToolContext:
    root: Path  # the project root; every path argument is relative to it
    store: Store | None = None  # memory store, for recall and note
    session_id: str | None = None
    allow_shell: bool = False  # shell is refused unless True
    shell_timeout: float = 30.0
    max_output: int = 16_000  # characters a tool result may return before truncation
    # turns a tool adds to the memory (note), committed with the run's own turns and snapshot in one transaction
    pending_turns: list[dict] = field(default_factory=list)


# Lengths of the short string arguments (patterns, paths, names), in their schemas: checked here, and kept by guided
# calls (agent/guide.py), so an argument a small model starts to repeat must close at the cap, a valid call
MAX_PATTERN_ARG = 256
MAX_PATH_ARG = 1024
MAX_NAME_ARG = 200

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _json_type(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def check_args(tool: Tool, args: object) -> dict:
    """The arguments checked against the tool's schema: a JSON object (None counts as {}), no unknown keys, the
    required ones present, string/integer/boolean values of that type, strings within their maxLength. Optional
    arguments given as null are dropped, so the tool's defaults apply."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ToolError(f"the arguments of {tool.name} must be a JSON object, got {_json_type(args)}")
    props = tool.parameters.get("properties", {})
    unknown = [repr(k) for k in args if k not in props]
    if unknown:
        takes = ", ".join(props) or "no arguments"
        raise ToolError(f"{tool.name} got unexpected argument(s) {', '.join(unknown)}; it takes: {takes}")
    missing = [k for k in tool.parameters.get("required", []) if args.get(k) is None]
    if missing:
        raise ToolError(f"{tool.name} is missing required argument(s): {', '.join(missing)}")
    for key, value in args.items():
        want = props[key].get("type")
        if value is not None and want in _TYPE_CHECKS and not _TYPE_CHECKS[want](value):
            raise ToolError(f"argument {key!r} of {tool.name} must be {want}, got {_json_type(value)}")
        most = props[key].get("maxLength")
        if isinstance(value, str) and most is not None and len(value) > most:
            raise ToolError(f"argument {key!r} of {tool.name} is {len(value):,} characters, over its limit of {most}")
    return {k: v for k, v in args.items() if v is not None}


def kwargs_runner(fn: Callable[..., str]) -> Callable[[ToolContext, dict], str]:
    """Adapt a tool function fn(ctx, **args) to Tool.run's run(ctx, args) (args already checked)."""
    return lambda ctx, args: fn(ctx, **args)


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with a visible marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... truncated: {len(text) - limit:,} more characters]"


def run_tool(ctx: ToolContext, tools: dict[str, Tool], name: str, args: object) -> tuple[bool, str]:
    """Run one tool call: (True, output) or (False, "error: ..."). Never raises an Exception (KeyboardInterrupt
    and SystemExit still pass); both outputs are capped at ctx.max_output characters."""
    try:
        tool = tools.get(name) if isinstance(name, str) else None
        if tool is None:
            raise ToolError(f"unknown tool {name!r}; the tools are: {', '.join(sorted(tools))}")
        ok, out = True, tool.run(ctx, check_args(tool, args))
    except ToolError as e:
        ok, out = False, f"error: {e}"
    except Exception as e:  # a bug or an OS error: still an answer the model can read
        ok, out = False, f"error: {type(e).__name__}: {e}"
    return ok, truncate(out, ctx.max_output)

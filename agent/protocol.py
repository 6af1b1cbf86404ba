"""The protocol seam: how a conversation with tools becomes what the model reads, and how its calls are held.

The agent's runner, LangChain's ChatDeltamem (agent/chat_model.py) and the OpenAI server (server/app.py) each turn
their own messages into plain ones ({"role", "content", "calls": [(name, arguments), ...]}) and leave the rest here:
which tools a tool_choice offers (`Offer.of`), the syntax calls take and where the tools are laid out (the chat
template's own `tools` where it takes them, else deltamem's listing in the system message), the ids that end a reply,
and the guide that holds an opened call to a well-formed call of an offered tool (agent/guide.py).

    offer = Offer.of(tools, "required")
    messages = conversation(template, [{"role": "user", "content": "hi"}], offer)
    guide = call_guide(tok, vocab_size, stop_ids(engine), template, offer)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from deltamem.agent.guide import ToolCallGuide
from deltamem.agent.parse import format_tool_call
from deltamem.agent.prompt import ChatTemplate, list_tools_in_system

log = logging.getLogger("deltamem.agent")


@dataclass(frozen=True)
class Offer:
    """The tools (OpenAI function specs) offered to the model, and whether it must call one."""

    tools: list[dict] = field(default_factory=list)
    required: bool = False

    @classmethod
    def of(cls, tools: list[dict] | None, choice: Any = None) -> Offer:
        """tool_choice: None or "auto" offers every tool; "none" none; "required" or "any" every tool, a call
        required; a tool's name, or {"function": {"name": ...}} (OpenAI's form), only that tool, a call required.
        ValueError where the choice names no offered tool."""
        tools = list(tools or [])
        if choice in (None, "auto"):
            return cls(tools)
        if choice == "none":
            return cls()
        if choice in ("required", "any"):
            return cls(tools, bool(tools))
        name = choice if isinstance(choice, str) else ((choice or {}).get("function") or {}).get("name")
        named = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if not named:
            raise ValueError(f"tool_choice {choice!r} names no offered tool")
        return cls(named, True)


def stop_ids(engine) -> list[int]:
    """The token ids that end a reply: the model's end-of-text ids and the chat format's <|im_end|>."""
    tok = engine.tokenizer
    return sorted(set(engine.config.eos_ids) | {tok.special_tokens.get("<|im_end|>", -1)} - {-1})


def lay_out(template: ChatTemplate, offer: Offer) -> bool:
    """Give the template the offered tools where it lays them out itself (template.tools); whether it does."""
    native = bool(offer.tools) and template.uses_tools
    template.tools = offer.tools if native else None
    return native


def conversation(template: ChatTemplate, messages: list[dict], offer: Offer) -> list[dict]:
    """Plain messages -> the chat template's: each message's `calls` written after its content in the syntax the
    model reads with these tools; the tools set on the template where it lays them out (template.tools), else
    listed at the end of the system message."""
    native = lay_out(template, offer)
    syntax = template.syntax_with(offer.tools)

    def written(m: dict) -> str:
        return m["content"] + "".join(format_tool_call(name, args, syntax) for name, args in m.get("calls", ()))

    out = [{"role": m["role"], "content": written(m)} for m in messages]
    return list_tools_in_system(out, offer.tools) if offer.tools and not native else out


def call_guide(tok, vocab_size: int, stops: list[int], template: ChatTemplate, offer: Offer) -> ToolCallGuide | None:
    """The guide for a reply with these tools offered (None with none): a call, once opened, is a well-formed call
    of an offered tool, and with `offer.required` the reply is one. A schema the grammar compiler does not take
    leaves calls unguided, with a warning."""
    if not offer.tools:
        return None
    try:
        return ToolCallGuide(tok, offer.tools, vocab_size, stops, template.syntax_with(offer.tools), offer.required)
    except ValueError as e:
        log.warning("tool calls unguided: %s", e)
        return None

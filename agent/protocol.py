"""The protocol seam: how a conversation with tools becomes what the model reads, and how its calls are held.

The agent's runner, LangChain's ChatDeltamem (agent/chat_model.py) and the OpenAI server (server/app.py) each turn
their own messages into plain ones ({"role", "content", "calls": [(name, arguments), ...]}) and leave the rest here:
which tools a tool_choice offers (`Offer.of`), the syntax calls take and where the tools are laid out (the chat
template's own `tools` where it takes them, else deltamem's listing in the system message), the ids that end a reply,
the guide that holds an opened call to a well-formed call of an offered tool, and an answer to the JSON schema of
OpenAI's response_format where one is asked for (agent/guide.py).

    offer = Offer.of(tools, "required", response_format)
    stops = stop_ids(engine)
    turn = prepare_turn(engine, template, [{"role": "user", "content": "hi"}], offer, stops)
    text = template.render(turn.messages)  # generate with turn.guide and stops; parse calls by turn.schemas
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from deltamem.agent.guide import ReplyGuide
from deltamem.agent.parse import format_tool_call
from deltamem.agent.prompt import ChatTemplate, list_tools_in_system, tool_schemas

log = logging.getLogger("deltamem.agent")


@dataclass(frozen=True)
class Offer:
    """What a reply may be: the tools (OpenAI function specs) offered to the model, whether it must call one, and
    the JSON schema an answer that calls none must meet (None: free text)."""

    tools: list[dict] = field(default_factory=list)
    required: bool = False
    answer: dict | None = None
    parallel: bool = True  # several calls in one reply (OpenAI's parallel_tool_calls), else one at most

    @classmethod
    def of(cls, tools: list[dict] | None, choice: Any = None, response_format: Any = None,
           parallel: bool = True) -> Offer:  # fmt: skip
        """tool_choice: None or "auto" offers every tool; "none" none; "required" or "any" every tool, a call
        required; a tool's name, or {"function": {"name": ...}} (OpenAI's form), only that tool, a call required.
        response_format: OpenAI's (answer_schema). ValueError where the choice names no offered tool, or the
        response_format is not one of OpenAI's."""
        tools, answer = list(tools or []), answer_schema(response_format)
        if choice in (None, "auto"):
            return cls(tools, answer=answer, parallel=parallel)
        if choice == "none":
            return cls(answer=answer)
        if choice in ("required", "any"):
            return cls(tools, bool(tools), answer, parallel)
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = choice if isinstance(choice, str) else fn.get("name") if isinstance(fn, dict) else None
        named = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if not named:
            raise ValueError(f"tool_choice {choice!r} names no offered tool")
        return cls(named, True, answer, parallel)


def answer_schema(response_format: Any) -> dict | None:
    """OpenAI's response_format -> the JSON schema an answer must meet: None for none or {"type": "text"};
    {"type": "object"} for json_object; json_schema's `schema` (an object where it gives none)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {"type": "object"}) if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return schema
        raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    raise ValueError("response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema'}")


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


def call_guide(tok, vocab_size: int, stops: list[int], template: ChatTemplate, offer: Offer) -> ReplyGuide | None:
    """The guide for a reply to this offer (None for free text with no tool): a call, once opened, is a well-formed
    call of an offered tool; with `offer.required` the reply is one; with `offer.answer` a reply without calls is
    JSON that schema accepts. A schema the grammar compiler does not take leaves the reply unguided, with a
    warning."""
    if not offer.tools and offer.answer is None:
        return None
    try:
        syntax = template.syntax_with(offer.tools)
        return ReplyGuide(tok, offer.tools, vocab_size, stops, syntax, offer.required, offer.answer, offer.parallel)
    except ValueError as e:
        log.warning("reply unguided: %s", e)
        return None


@dataclass
class Turn:
    """A conversation made ready for the model's reply: its messages in the chat template's form, the offered tools'
    argument schemas by name (to read the calls back) and the guide of the reply."""

    messages: list[dict]
    schemas: dict[str, dict]
    guide: ReplyGuide | None


def prepare_turn(
    engine, template: ChatTemplate, messages: list[dict], offer: Offer, stops: list[int], guided: bool = True
) -> Turn:
    """Plain messages and an offer -> the Turn the model replies to; stops: the ids that end a reply (stop_ids).
    guided=False leaves tool calls unguided (a JSON answer asked for without tools is still held to its schema)."""
    guide = None
    if guided or not offer.tools:
        guide = call_guide(engine.tokenizer, engine.config.vocab_size, stops, template, offer)
    return Turn(conversation(template, messages, offer), tool_schemas(offer.tools), guide)

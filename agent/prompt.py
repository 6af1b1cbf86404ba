"""Prompts: the model's own chat template (jinja2, sandboxed as transformers renders it) and the system prompt that
lists the tools.

Messages are dicts with "role" and "content"; only those two keys reach the template. The agent stores the
assistant's raw output (tool-call blocks included) as its content, so re-rendering a conversation reproduces the
text the model state has already consumed, and every turn only appends to it.
"""

from __future__ import annotations

import json
from functools import cached_property

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from deltamem.agent.parse import CLOSE, OPEN
from deltamem.model.tokenizer import CHATML

SYSTEM = """You are deltamem, an assistant that works inside the project "{project}". You have read the files the \
user ingested; your memory of them persists between sessions. Answer concisely and cite file paths.

To use a tool, write exactly one block per call:
{open}{{"name": "<tool name>", "arguments": {{...}}}}{close}
then stop and wait for its result. Write your final answer without any tool call.

Tools:
{tools}"""


class TemplateError(ValueError):
    """The model's chat template failed to render."""


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML
        self.extra = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def for_tokenizer(cls, tok) -> ChatTemplate:
        def text(i):
            return tok.decode([i]) if i is not None else ""

        return cls(tok.chat_template, text(tok.bos_id), text(tok.eos_id))

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template does not parse: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt, **self.extra)
        except TemplateError:
            raise
        except SecurityError as e:  # a template reaching for Python internals: nothing of it ran
            raise TemplateError(
                f"the model's chat template tried an operation the sandbox forbids ({e}); not rendered. A chat "
                "template only needs messages, loops and strings: this file may be malicious"
            ) from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template failed: {e}") from e


def system_prompt(project: str, tools: dict) -> str:
    lines = [
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
        for t in tools.values()
    ]
    return SYSTEM.format(project=project, open=OPEN, close=CLOSE, tools="\n".join(lines) or "(none)")


def file_message(path: str, text: str | None) -> dict:
    """The message that shows the model one ingested file (text None: the file was removed)."""
    if text is None:
        return {"role": "user", "content": f"File {path} was removed from the project."}
    return {"role": "user", "content": f"File {path}:\n```\n{text}\n```"}

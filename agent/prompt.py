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
import jinja2.meta
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
    """A model's chat template. Templates that read a `tools` variable (Qwen3.5, Qwen3, most tool-trained models)
    get the tool list passed to them, as transformers' apply_chat_template(tools=...) does, and lay it out in the
    words the model was trained on; `call_syntax` is the tool-call form the template writes ("xml" when it writes
    <function=...> blocks, else "json"). Every render passes preserve_thinking=True so that thinking templates keep
    earlier turns' reasoning and a conversation renders append-only."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML
        self.extra = {"bos_token": bos_token, "eos_token": eos_token, "preserve_thinking": True}
        self.tools: list[dict] | None = None  # OpenAI-style function specs, rendered where the template takes them

    @cached_property
    def uses_tools(self) -> bool:
        """The template lays out a `tools` variable and its calls are <tool_call> blocks, which agent/parse.py reads
        (a template with another call syntax, such as OLMo 3's <function_calls>, gets deltamem's own prompt)."""
        try:
            takes = "tools" in jinja2.meta.find_undeclared_variables(self._env.parse(self.source))
        except jinja2.TemplateError:
            return False  # rendering reports the error
        return takes and OPEN in self.source

    @property
    def call_syntax(self) -> str:
        return "xml" if "<function=" in self.source else "json"

    def syntax_with(self, tools) -> str:
        """The form tool calls take when these tools are offered: the template's own where it lays them out, else
        JSON, the form deltamem's system prompt (list_tools_in_system) teaches."""
        return self.call_syntax if tools and self.uses_tools else "json"

    @classmethod
    def for_tokenizer(cls, tok) -> ChatTemplate:
        def text(i):
            return tok.decode([i]) if i is not None else ""

        return cls(tok.chat_template, text(tok.bos_id), text(tok.eos_id))

    @cached_property
    def _env(self) -> ImmutableSandboxedEnvironment:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        return env

    @cached_property
    def _template(self) -> jinja2.Template:
        try:
            return self._env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template does not parse: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        extra = dict(self.extra, tools=self.tools) if self.tools and self.uses_tools else self.extra
        try:
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt, **extra)
        except TemplateError:
            raise
        except SecurityError as e:  # a template reaching for Python internals: nothing of it ran
            raise TemplateError(
                f"the model's chat template tried an operation the sandbox forbids ({e}); not rendered. A chat "
                "template only needs messages, loops and strings: this file may be malicious"
            ) from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template failed: {e}") from e


def system_prompt(project: str, tools: dict, native: bool = False) -> str:
    """The agent's system prompt. native: the chat template lists the tools itself (ChatTemplate.uses_tools), in
    the words and call syntax the model was trained on; only the project's part is written here."""
    if native:
        return SYSTEM.split("\n\n", 1)[0].format(project=project)
    lines = [json.dumps(spec["function"], ensure_ascii=False) for spec in tool_specs(tools)]
    return SYSTEM.format(project=project, open=OPEN, close=CLOSE, tools="\n".join(lines) or "(none)")


def list_tools_in_system(messages: list[dict], specs: list[dict]) -> list[dict]:
    """For a chat template that takes no tools: the OpenAI function specs listed, with the JSON call syntax the parser
    reads, at the end of the system message (a new one first if there is none)."""
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in specs)
    note = f'You can call these tools by writing {OPEN}{{"name": ..., "arguments": {{...}}}}{CLOSE}:\n{listing}'
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + note}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def tool_schemas(specs: list[dict]) -> dict[str, dict]:
    """Tool name -> its parameters' JSON schema, from OpenAI function specs (what parse_tool_calls types values by)."""
    functions = [t.get("function") or {} for t in specs]
    return {f.get("name"): f.get("parameters") or {} for f in functions}


def tool_specs(tools: dict) -> list[dict]:
    """The tools as OpenAI function specs, the form chat templates' `tools` variable takes."""
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools.values()
    ]


MAP_PATH = "<repository map>"  # the ingest ledger's entry for the map (no real file can have this path)


def file_message(path: str, text: str | None) -> dict:
    """The message that shows the model one ingested file (text None: the file was removed), or the repository map."""
    if path == MAP_PATH:
        return {"role": "user", "content": f"Repository map (files and their top-level definitions):\n```\n{text}\n```"}
    if text is None:
        return {"role": "user", "content": f"File {path} was removed from the project."}
    return {"role": "user", "content": f"File {path}:\n```\n{text}\n```"}

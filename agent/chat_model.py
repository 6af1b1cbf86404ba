"""ChatDeltamem: the engine as a LangChain chat model (tool binding, streaming, usage metadata).

    from deltamem.agent.chat_model import ChatDeltamem
    llm = ChatDeltamem(model="default", max_tokens=64).bind_tools([my_tool])
    llm.invoke("hi")

Each instance keeps its own model state and, like the agent, feeds only what a call adds to the conversation it
saw last (a different history is re-read from the start). The weights of one checkpoint are loaded once per
process and shared between instances. Tools are listed in the system prompt and calls come back parsed from
`<tool_call>` blocks.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from deltamem.agent.parse import parse_tool_calls
from deltamem.agent.prompt import tool_schemas
from deltamem.agent.protocol import Offer, Turn, prepare_turn
from deltamem.agent.session import AgentSession
from deltamem.model.options import ModelOptions

_MODELS: dict[ModelOptions, Any] = {}  # loaded Engines whose weights are shared, by their options
_LOCK = threading.Lock()


def _engine(options: ModelOptions):
    with _LOCK:
        if options not in _MODELS:
            _MODELS[options] = options.load()
        base = _MODELS[options]
    return base.sibling()


def _default(name: str, **kw):
    return Field(default_factory=lambda: ModelOptions.default(name), **kw)


class ChatDeltamem(BaseChatModel):
    """A local deltamem hybrid model as a LangChain chat model. The model options (model, window, sink, device,
    dtype, quant, compile) mean what they mean in model/options.py's ModelOptions and the CLI, with the same
    defaults (left out: their DELTAMEM_* environment variable, else "default"/"auto")."""

    model: str = _default("model", alias="model_name")
    window: int | None | Literal["auto"] = "auto"
    sink: int = 4
    device: str = _default("device")
    dtype: str = _default("dtype")
    quant: str = _default("quant")
    compile: bool | Literal["auto"] = _default("compile")
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    model_config = ConfigDict(populate_by_name=True)

    _session: AgentSession | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "deltamem"

    @property
    def options(self) -> ModelOptions:
        return ModelOptions(self.model, self.device, self.dtype, self.quant, self.compile, self.window, self.sink)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**vars(self.options), "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(
            ls_provider="deltamem", ls_model_name=kwargs.get("model", self.model), ls_max_tokens=self.max_tokens
        )
        return params

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """tool_choice: "auto" (default), "none", "any"/"required" (a call, always) or a tool's name (that tool);
        a call, once opened, is held to a well-formed call of an offered tool (agent/guide.py)."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _offered(self, kwargs: dict) -> Offer:
        """The tools a call offers the model, whether it must call one (bind_tools' tool_choice), and the JSON
        schema of an answer (`bind(response_format=...)`, OpenAI's form); `parallel_tool_calls=False`: one call at
        most."""
        return Offer.of(kwargs.get("tools"), kwargs.get("tool_choice"), kwargs.get("response_format"),
                        kwargs.get("parallel_tool_calls") is not False)  # fmt: skip

    # --- conversion ----------------------------------------------------------------------------------------
    def _turn(self, messages: list[BaseMessage], offer: Offer) -> Turn:
        """LangChain messages -> the turn the model replies to (agent/protocol.py: calls in the syntax the model
        reads, the tools where the template takes them, else in the system prompt; the reply's guide)."""
        roles = ((SystemMessage, "system"), (HumanMessage, "user"), (AIMessage, "assistant"), (ToolMessage, "tool"))
        plain = []
        for m in messages:
            content = m.content if isinstance(m.content, str) else _text_of(m.content)
            calls = [(c["name"], c["args"]) for c in m.tool_calls] if isinstance(m, AIMessage) else []
            role = next((r for kind, r in roles if isinstance(m, kind)), m.type)
            plain.append({"role": role, "content": content, "calls": calls})
        s = self._state()
        return prepare_turn(s.engine, s.template, plain, offer, s.stop_ids)

    def _state(self) -> AgentSession:
        if self._session is None:
            self._session = AgentSession(_engine(self.options), None, "")
        return self._session

    # --- generation ----------------------------------------------------------------------------------------
    def _sampling(self, stop: list[str] | None) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(stop or self.stop or []),
        }

    @staticmethod
    def _usage(s: AgentSession, reply) -> UsageMetadata:
        """Tokens of the prompt, of the reply, and how many prompt tokens the state already held (not re-fed)."""
        out = len(reply.generated)
        prompt = len(s.ids) - out
        return UsageMetadata(
            input_tokens=prompt,
            output_tokens=out,
            total_tokens=prompt + out,
            input_token_details={"cache_read": prompt - reply.fed},
        )

    def _run(self, messages, stop, offer: Offer, on_piece):
        s = self._state()
        turn = self._turn(messages, offer)
        s.guide = turn.guide
        reply = s.reply(turn.messages, self.max_tokens, on_piece, **self._sampling(stop))
        return reply, self._usage(s, reply)

    def _message(self, text: str, usage: UsageMetadata, offer: Offer) -> AIMessage:
        if not offer.tools:
            return AIMessage(content=text, usage_metadata=usage, response_metadata={"model_name": self.model})
        parsed = parse_tool_calls(text, schemas=tool_schemas(offer.tools))
        return AIMessage(
            content=parsed.content,
            tool_calls=[
                {"name": c["name"], "args": c["arguments"], "id": c["id"], "type": "tool_call"} for c in parsed.calls
            ],
            invalid_tool_calls=[
                {"name": None, "args": None, "id": None, "error": e, "type": "invalid_tool_call"} for e in parsed.errors
            ],
            usage_metadata=usage,
            response_metadata={"model_name": self.model},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        offer = self._offered(kwargs)
        on_piece = (lambda p: run_manager.on_llm_new_token(p)) if run_manager else None
        reply, usage = self._run(messages, stop, offer, on_piece)
        return ChatResult(generations=[ChatGeneration(message=self._message(reply.text, usage, offer))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self._offered(kwargs).tools:  # tool calls are parsed from the whole reply: one chunk
            result = self._generate(messages, stop, run_manager, **kwargs)
            msg = result.generations[0].message
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=msg.content,
                    usage_metadata=msg.usage_metadata,
                    response_metadata=msg.response_metadata,
                    tool_call_chunks=[
                        {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                        for i, c in enumerate(msg.tool_calls)
                    ],
                )
            )
            return
        s = self._state()
        turn = self._turn(messages, self._offered(kwargs))  # no tools: free text, or a JSON answer's guide
        s.guide = turn.guide
        it = s.stream_reply(turn.messages, self.max_tokens, **self._sampling(stop))
        while True:
            try:
                piece = next(it)
            except StopIteration as done:
                reply = done.value
                break
            if run_manager:
                run_manager.on_llm_new_token(piece)
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=self._usage(s, reply),
                chunk_position="last",
                response_metadata={"model_name": self.model},
            )
        )


def _text_of(content: list) -> str:
    return "".join(c if isinstance(c, str) else c.get("text", "") for c in content if isinstance(c, str | dict))

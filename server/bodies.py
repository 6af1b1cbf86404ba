"""The request bodies of POST /v1/chat/completions and /v1/completions as pydantic models: every field of OpenAI's
that this server honours, with the types, ranges and nullability of OpenAI's API reference (where this server
takes less, its limit, said in the field's description). They document the API: /openapi.json gives them as the
routes' request bodies (`request_body`, `document`), so that a client generator or a fuzzer (schemathesis) knows
the bodies. They do not validate requests: server/api.py's checks stay the authority, and a body that breaks them
gets a 400 in OpenAI's error shape naming the field (never FastAPI's 422). Fields OpenAI defines that this server
does not honour (audio, modalities, store, metadata, best_of, suffix...) are left out here and ignored if sent;
null, where a field takes it, means the field's default."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import models_json_schema

from deltamem.server.api import MAX_N

COMPONENTS = "#/components/schemas/{model}"
INT64 = 2**63
NonEmpty = Annotated[str, Field(min_length=1)]


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


def optional(description: str, **constraints: Any) -> Any:
    """A field that may be left out but, as in OpenAI's reference, not sent as null (its schema shows no default)."""
    return Field(None, description=description, json_schema_extra=_no_default, **constraints)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# messages


class TextPart(Body):
    type: Literal["text"]
    text: str = Field(description="The part's text; a message's text parts are joined.")


Content = Annotated[str | list[TextPart], Field(description="The message's text, or its parts (their text joined).")]


class DeveloperMessage(Body):
    """Instructions that take the place of a system message (read as one)."""

    role: Literal["developer"]
    content: Content


class SystemMessage(Body):
    role: Literal["system"]
    content: Content


class UserMessage(Body):
    role: Literal["user"]
    content: Content


class FunctionCall(Body):
    name: str = Field(description="The function called.")
    arguments: str = Field(description="Its arguments: a JSON object, as a string.")


class ToolCall(Body):
    """A call of an offered function, as OpenAI returned it in an earlier reply."""

    id: str = Field(description="The call's id (tool messages answer the calls in order).")
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Body):
    """An earlier reply: its text, or its tool calls, or both."""

    role: Literal["assistant"]
    content: Content | None = Field(None, description="The reply's text (null where it only called tools).")
    tool_calls: list[ToolCall] = optional("The calls the reply made.")


class ToolMessage(Body):
    """A tool's result, answering a call of an earlier assistant message."""

    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(description="The id of the call it answers.")


Message = Annotated[DeveloperMessage | SystemMessage | UserMessage | AssistantMessage | ToolMessage,
                    Field(discriminator="role")]  # fmt: skip


# tools and response formats


class FunctionDefinition(Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]+$", max_length=64, description="The function's name.")
    description: str = optional("What the function does, for the model.")
    parameters: dict[str, Any] = optional(
        "The function's arguments as a JSON Schema object. A call the model makes is held to it (guided decoding) "
        "unless the server runs with --free-tool-calls."
    )
    strict: bool | None = Field(None, description="Accepted; calls are held to their schema either way.")


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Body):
    name: str = Field(description="One of the offered tools' names.")


class NamedToolChoice(Body):
    """Call this function."""

    type: Literal["function"]
    function: NamedFunction


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    """The answer is a JSON object."""

    type: Literal["json_object"]


class JsonSchema(Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]+$", max_length=64, description="The schema's name.")
    description: str = optional("What the answer is, for the model.")
    schema_: dict[str, Any] = Field(None, alias="schema", json_schema_extra=_no_default,
                                    description="The JSON Schema the answer meets (default: any object).")  # fmt: skip
    strict: bool | None = Field(None, description="Accepted; the answer is held to the schema either way.")


class JsonSchemaFormat(Body):
    """The answer is JSON that the schema accepts (guided decoding: whole or streamed)."""

    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(Body):
    include_usage: bool = optional("End the stream with a chunk holding the usage and no choices.")


# the fields both bodies share

LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[int, Field(ge=-100, le=100)]],
    WithJsonSchema({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "maxProperties": 1024,
                    "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100}}),
]  # fmt: skip


class Sampling(Body):
    model: str = Field(description="The model: the one this server runs (GET /v1/models); another is a 404.")
    max_tokens: int | None = Field(None, ge=1, description=(
        "The most tokens the reply may have, up to the server's prompt limit (--max-prompt-tokens), which is also "
        "the default: the reply may then run to the context's end."))  # fmt: skip
    temperature: float | None = Field(1, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float | None = Field(1, ge=0, le=1, description="Nucleus sampling's probability mass; 0 is greedy.")
    n: int | None = Field(1, ge=1, le=MAX_N, description=(
        f"How many choices, each from the prompt's state read once (OpenAI allows 128; this server {MAX_N})."))
    stream: bool | None = Field(False, description="Stream the answer as server-sent events, ending with [DONE].")
    stream_options: StreamOptions | None = Field(None, description="Options of a streamed answer.")
    stop: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=4)] | None = Field(
        None, description="Up to 4 sequences at which the reply ends (not included).")
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1, description=(
        "Sampling is reproducible for a seed; choice k of n draws as a single request with seed + k would."))
    presence_penalty: float | None = Field(0, ge=-2, le=2, description=(
        "Subtracted from a token's logit once it appears in the reply."))
    frequency_penalty: float | None = Field(0, ge=-2, le=2, description=(
        "Subtracted from a token's logit for each time it appears in the reply."))
    logit_bias: LogitBias | None = Field(None, description=(
        "Token id -> a bias (-100 to 100; a fraction is taken too) added to its logit."))
    user: str = optional(
        "The end user: without an X-Deltamem-Session header, the prompt states are kept in a session of its own "
        "(serve:user:NAME)."
    )


class ChatCompletionRequest(Sampling):
    """The body of POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1, description=(
        "The conversation so far, rendered by the model's chat template; a re-sent conversation that extends an "
        "earlier one has only its new part read (the prefix state cache)."))
    max_completion_tokens: int | None = Field(None, ge=1, description="As max_tokens, which it takes precedence over.")
    tools: list[Tool] = optional("Functions the model may call (as guided calls of their schemas).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice = optional(
        "none: no call; auto (the default where tools are offered): the model decides; required: at least one call; "
        "or a named function, which is called."
    )
    parallel_tool_calls: bool = Field(True, description="false: one call at most, which ends the reply.")
    response_format: ResponseFormat = optional("The answer's format: text, or JSON (json_object, json_schema).")
    logprobs: bool | None = Field(False, description="Return the log-probabilities of the reply's tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description=(
        "And of this many likeliest tokens at each position; needs logprobs: true."))


class CompletionRequest(Sampling):
    """The body of POST /v1/completions."""

    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (or a list of one text; this server takes one prompt).")
    echo: bool | None = Field(False, description="Give the prompt back before each choice's text (not with logprobs).")
    logprobs: int | None = Field(None, ge=0, le=5, description=(
        "Return the log-probabilities of the reply's tokens and of this many likeliest tokens at each position."))


# answers this module documents: errors


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, authentication_error...")
    param: str | None = Field(description="The request's field at fault, where one is.")
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: a malformed body is a 400 naming its field; an unknown model or route a 404; a body over 8 MiB
    a 413; a missing or wrong API key a 401."""

    error: ErrorDetail


ERRORS = {"4XX": {"model": ErrorResponse, "description": "An error in OpenAI's shape"}}
REQUESTS = (ChatCompletionRequest, CompletionRequest)


def request_body(model: type[BaseModel]) -> dict:
    """A route's openapi_extra: its request body is this model (its schema among the components, see document)."""
    schema = {"$ref": COMPONENTS.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def component_schemas(model_name: str | None = None, max_tokens: int | None = None) -> dict[str, dict]:
    """The request models' JSON schemas by name, referring to each other as OpenAPI components; with a server's
    model_name and prompt limit, `model` is held to the one and max_tokens (max_completion_tokens) to the other."""
    _, top = models_json_schema([(m, "validation") for m in REQUESTS], ref_template=COMPONENTS)
    schemas = top["$defs"]
    for m in REQUESTS:
        fields = schemas[m.__name__]["properties"]
        if model_name is not None:
            fields["model"]["enum"] = [model_name]
        for key in ("max_tokens", "max_completion_tokens"):
            if key in fields and max_tokens is not None:
                fields[key]["anyOf"][0]["maximum"] = max_tokens
    return schemas


def document(app: FastAPI, model_name: str | None = None, max_tokens: int | None = None) -> None:
    """Have the app's /openapi.json give the request models among its components (request_body refers to them)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            components = build().setdefault("components", {}).setdefault("schemas", {})
            components.update(component_schemas(model_name, max_tokens))
        return app.openapi_schema

    app.openapi = openapi

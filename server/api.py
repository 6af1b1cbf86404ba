"""OpenAI's API as plain functions, apart from HTTP and the engine (as llama.cpp's server keeps its request parsing):
a request body checked and read into what the engine needs (sampling parameters, the offer of tools and answer
format through agent/protocol.py, plain messages), and the replies written back in OpenAI's shapes (completions,
chat completions with tool calls, stream chunks, usage, errors). server/app.py holds the routes."""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any

from deltamem.agent.parse import CLOSE, OPEN, parse_tool_calls
from deltamem.agent.protocol import Offer, answer_schema

MAX_BODY = 8 << 20
MAX_N = 16  # choices of one request (OpenAI allows up to 128)
ROLES = ("system", "user", "assistant", "tool", "developer")


class ApiError(Exception):
    """An error in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


def read_body(raw: bytes, model_name: str) -> dict:
    """A request's body: a JSON object of at most MAX_BODY bytes, for this server's model."""
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the body is not JSON: nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise ApiError(404, f"model {str(body.get('model'))[:100]!r} is not served here; this server runs "
                       f"{model_name!r}", "not_found_error", "model")  # fmt: skip
    return body


def _number(body: dict, key: str, default: float, low: float, high: float, integer: bool = False) -> float:
    """A numeric field: absent or null means the default, else a finite number (a whole one where `integer`) from
    low to high, as OpenAI's reference gives them."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))  # an int too large for a float is still an int
    if not ok or (integer and value != int(value)) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {what} from {low} to {high}", param=key)
    return int(value) if integer else float(value)


def sampling(body: dict, chat: bool, context: int) -> dict:
    """The sampling parameters of a body, checked: max_new_tokens (max_completion_tokens, else max_tokens; up to
    the context, which is also the default: the reply's room is then what the prompt leaves), temperature (0 to 2,
    default 1; the Sampler draws greedily under 1e-5), top_p (0 to 1, default 1; 0 is greedy), seed (a 64-bit
    integer; choice k of n uses seed + k), stop (a string or up to 4), presence_penalty and frequency_penalty (-2 to
    2), logit_bias ({token id: -100 to 100}), n (1 to MAX_N choices) and the log-probabilities asked: chat's
    logprobs (a boolean) with top_logprobs (0 to 20), completions' logprobs (0 to 5 alternatives); `logprobs` here
    is None or the number of alternatives. echo (completions): the prompt before each choice's text."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    out = {
        "max_new_tokens": _number(body, key, None, 1, context, integer=True),
        "temperature": _number(body, "temperature", 1.0, 0, 2),
        "top_p": _number(body, "top_p", 1.0, 0, 1),
        "seed": _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2, 2),
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "n": _number(body, "n", 1, 1, MAX_N, integer=True),
        "logprobs": _logprobs(body, chat),
        "echo": _flag(body, "echo") if not chat else False,
    }
    if out["top_p"] == 0:  # only the likeliest token: greedy
        out["temperature"], out["top_p"] = 0.0, 1.0
    if out["echo"] and out["logprobs"] is not None:
        raise ApiError(400, "echo with logprobs is not supported: the prompt's log-probabilities are not computed "
                       "(its state comes from the prefix cache)", param="echo")  # fmt: skip
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    return {**out, "stop": stop}


def _flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", param=key)
    return default if value is None else value


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 1024:
        raise ApiError(400, "logit_bias must be an object of up to 1024 token ids", param="logit_bias")
    out = {}
    for k, b in value.items():
        try:
            tok = int(k)
        except ValueError:
            tok = -1
        number = isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b)
        if tok < 0 or str(tok) != k.strip() or not number or not -100 <= b <= 100:
            raise ApiError(400, f"logit_bias: {k[:40]!r} must be a token id with a bias from -100 to 100",
                           param="logit_bias")  # fmt: skip
        out[tok] = float(b)
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    if not chat:  # completions: logprobs is the number of alternatives, 0 to 5
        return _number(body, "logprobs", None, 0, 5, integer=True)
    top = _number(body, "top_logprobs", None, 0, 20, integer=True)
    if not _flag(body, "logprobs"):
        if top is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def logprobs_of(records: list, token_bytes, chat: bool, offset: int = 0) -> dict:
    """Sampler records (id, logprob, alternatives) in OpenAI's shape: chat's {"content": [{token, logprob, bytes,
    top_logprobs}]}, completions' {tokens, token_logprobs, top_logprobs, text_offset} (offset: where the text of
    these tokens starts in the choice's text)."""

    def token(i: int) -> tuple[str, list[int]]:
        b = token_bytes(i)
        return b.decode("utf-8", errors="replace"), list(b)

    if chat:
        content = []
        for tok, lp, alts in records:
            text, raw = token(tok)
            top = [dict(zip(("token", "bytes"), token(a), strict=True), logprob=x) for a, x in alts]
            content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}
    texts = [token(tok)[0] for tok, _, _ in records]
    offsets = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in records],
            "top_logprobs": [{token(a)[0]: x for a, x in alts} for _, _, alts in records],
            "text_offset": offsets}  # fmt: skip


def offer_of(body: dict) -> Offer:
    """What a chat request lets the reply be, checked: `tools` (OpenAI function specs: a name, optional description
    and JSON schema parameters), `tool_choice` (none, auto, required or {"function": {"name": ...}}) and
    `response_format` (text, json_object or json_schema) (agent/protocol.py)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list of function specs", param="tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ApiError(400, f"tools[{i}].function.name must be a non-empty string", param="tools")
        params, about = fn.get("parameters"), fn.get("description")
        if not isinstance(params, dict | None) or not isinstance(about, str | None):
            raise ApiError(400, f"tools[{i}].function: parameters must be an object, description text", param="tools")
    named = isinstance(choice, dict) and isinstance(choice.get("function"), dict)
    if choice not in (None, "auto", "none", "required") and not named:
        raise ApiError(400, "tool_choice must be none, auto, required or a function among tools", param="tool_choice")
    if choice == "required" and not tools:
        raise ApiError(400, "tool_choice required needs tools", param="tool_choice")
    try:
        answer_schema(body.get("response_format"))
    except ValueError as e:
        raise ApiError(400, str(e), param="response_format") from None
    try:
        return Offer.of(tools, choice, body.get("response_format"), _flag(body, "parallel_tool_calls", True))
    except ValueError:
        raise ApiError(400, "tool_choice must be none, auto, required or a function among tools",
                       param="tool_choice") from None


def chat_messages(messages: Any) -> list[dict]:
    """OpenAI chat messages -> plain ones (agent/protocol.py): developer as system, text content parts joined,
    assistant tool_calls as (name, arguments); a tool message answers an earlier assistant message's calls."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out, called = [], False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role: system, user, assistant or tool", param="messages")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: parts must be objects with a text", param="messages")
            content = "".join(p.get("text", "") for p in content)
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        calls = [_call(i, c) for c in _list(m.get("tool_calls"), f"messages[{i}].tool_calls")]
        if m["role"] == "tool" and not called:
            raise ApiError(400, f"messages[{i}]: a tool message must answer an assistant message's tool_calls",
                           param="messages")  # fmt: skip
        called = called or bool(calls)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content, "calls": calls})
    return out


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a list", param="messages")
    return value


def _call(i: int, call: Any) -> tuple[str, dict]:
    """An assistant message's tool call: {"function": {"name": str, "arguments": a JSON object as a string}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
        raise ApiError(400, f"messages[{i}].tool_calls: each needs a function with a name and arguments (a JSON "
                       "string)", param="messages")  # fmt: skip
    try:
        args = json.loads(fn["arguments"] or "{}")
    except (ValueError, RecursionError):
        args = {}
    return fn["name"], args if isinstance(args, dict) else {}


def openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed tool calls (agent/parse.py) as OpenAI's tool_calls entries, arguments as a JSON string."""
    return [
        {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
        for c in calls
    ]  # fmt: skip


def finish_reason(stopped_by: str) -> str:
    return "length" if stopped_by == "length" else "stop"


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def assistant_message(reply: str, schemas: dict, parallel: bool = True) -> tuple[dict, bool]:
    """A reply as the chat message OpenAI returns, and whether it calls tools: where tools were offered (their
    schemas by name), the calls parsed from the reply in OpenAI's form (the first alone unless `parallel`: a reply
    left unguided may hold more), the rest as content."""
    if schemas:
        parsed = parse_tool_calls(reply, schemas=schemas)
        if parsed.calls:
            calls = parsed.calls if parallel else parsed.calls[:1]
            return {"role": "assistant", "content": parsed.content or None,
                    "tool_calls": openai_calls(calls)}, True  # fmt: skip
    return {"role": "assistant", "content": reply}, False


_JSON_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"arguments"\s*:\s*')
_XML_HEAD = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER_END = "</parameter>"


class CallStream:
    """A guided reply's tool calls streamed as OpenAI streams them: once a call's name is decoded, a tool_calls
    delta with its id, type and name; then its arguments in fragments as they come (calls written as JSON: the
    arguments' text as written; as XML: each parameter once closed, as JSON). Their concatenation is the call's
    arguments, a JSON object. Only for guided replies, whose calls are well formed (agent/guide.py)."""

    def __init__(self, schemas: dict, parallel: bool = True):
        self.schemas, self.parallel = schemas, parallel
        self.sent: list[str] = []  # each announced call's arguments sent so far

    def deltas(self, text: str, final: bool = False) -> list[dict]:
        """The tool_calls deltas that the reply's text so far adds (final: the reply has ended)."""
        out = []
        for i, body in enumerate(text.split(OPEN)[1 : None if self.parallel else 2]):
            closed = CLOSE in body or final
            body = body.split(CLOSE, 1)[0]
            head = _JSON_HEAD.match(body) or _XML_HEAD.match(body)
            if head is None:
                break
            if i == len(self.sent):
                self.sent.append("")
                out.append({"index": i, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                            "function": {"name": head.group(1).strip(), "arguments": ""}})  # fmt: skip
            args = self._arguments(body, head, closed)
            if args is not None and len(args) > len(self.sent[i]) and args.startswith(self.sent[i]):
                out.append({"index": i, "function": {"arguments": args[len(self.sent[i]) :]}})
                self.sent[i] = args
        return out

    def _arguments(self, body: str, head: re.Match, closed: bool) -> str | None:
        """The call's arguments as far as they are surely written (all of them once the call is closed)."""
        if head.re is _JSON_HEAD:
            raw = body[head.end() :].rstrip()
            if closed:  # the arguments' object, without the call's own closing brace
                return raw[:-1].rstrip() if raw.endswith("}") else raw
            for keep in range(min(len(CLOSE) - 1, len(raw)), 0, -1):  # the start of the call's end tag waits
                if raw.endswith(CLOSE[:keep]):
                    raw = raw[:-keep]
                    break
            return raw.rstrip("} \n\t")  # and what may yet be the call's closing brace
        if not closed:  # the parameters written so far
            end = body.rfind(_PARAMETER_END)
            if end == -1:
                return "{"
            body = body[: end + len(_PARAMETER_END)] + "\n</function>"
        calls = parse_tool_calls(OPEN + body + CLOSE, schemas=self.schemas).calls
        if not calls:
            return None
        whole = json.dumps(calls[0]["arguments"], ensure_ascii=False)
        return whole if closed else whole[:-1]


def releasable(text: str) -> int:
    """How much of a reply's text so far is surely not part of a tool call: up to `<tool_call>` where it has
    opened, else all but an ending that could still become its start (what a stream may send as content now)."""
    at = text.find(OPEN)
    if at >= 0:
        return at
    for keep in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def choice(k: int, reply: str, reason: str, chat: bool, schemas: dict, logprobs: dict | None,
           parallel: bool = True) -> dict:  # fmt: skip
    """One of a completion's choices: a chat message (calls parsed where tools were offered) or a text."""
    if not chat:
        return {"index": k, "text": reply, "finish_reason": reason, "logprobs": logprobs}
    message, called = assistant_message(reply, schemas, parallel)
    return {"index": k, "message": message, "logprobs": logprobs, "finish_reason": "tool_calls" if called else reason}


def completion(rid: str, created: int, model: str, choices: list[dict], stats: dict, chat: bool) -> dict:
    """The whole answer: a chat completion or a text completion."""
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": stats}  # fmt: skip


def chunk(rid: str, created: int, model: str, chat: bool, delta: dict | str, reason: str | None = None,
          index: int = 0, logprobs: dict | None = None) -> str:  # fmt: skip
    """One server-sent event of a streamed answer: choice `index`'s delta (chat) or text (completions)."""
    choice = ({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason} if chat
              else {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": reason})  # fmt: skip
    doc = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": [choice]}  # fmt: skip
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def wants_usage(body: dict) -> bool:
    """stream_options.include_usage: whether a stream ends with a usage chunk."""
    options = body.get("stream_options")
    valid = isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)
    if options is not None and not valid:
        raise ApiError(400, "stream_options must be an object such as {'include_usage': true}", param="stream_options")
    return bool(options and options.get("include_usage"))


def usage_chunk(rid: str, created: int, model: str, chat: bool, stats: dict) -> str:
    """The last event of a stream whose client asked for usage (stream_options.include_usage): no choices."""
    doc = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": [], "usage": stats}  # fmt: skip
    return f"data: {json.dumps(doc)}\n\n"


def error_event(e: ApiError) -> str:
    return f"data: {json.dumps({'error': {'message': str(e), 'type': e.kind}})}\n\n"

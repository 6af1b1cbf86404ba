"""`deltamem serve`: an OpenAI-compatible HTTP API (FastAPI) over one engine, with the prefix state cache of
server/prefix.py, so any agent tool that re-sends its growing conversation gets resumable memory.

Endpoints: POST /v1/chat/completions (messages and tools rendered by the model's own chat template, tool calls parsed
back in its syntax and returned to the client, which runs them; response_format's JSON answers guided to their
schema; SSE streaming), POST /v1/completions, GET /v1/models, GET /health. Bodies are read and replies written by
server/api.py's plain functions (errors in OpenAI's shape with their status codes); this module holds the routes,
the engine's lock and the prefix cache. Prompts are read one at a time, in arrival order (one engine); replies are
decoded together (server/batching.py: one step for every active reply; by default on a GPU) or, without batching,
one after the other. Security: an API key (Authorization: Bearer) when one is set, a body size limit and a prompt
token limit; requests never name files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltamem.agent.guide import ReplyGuide
from deltamem.agent.prompt import ChatTemplate, TemplateError
from deltamem.agent.protocol import prepare_turn, stop_ids
from deltamem.model.sampling import Sampler, TextStream
from deltamem.server import api, bodies
from deltamem.server.api import ApiError
from deltamem.server.batching import GPU_PREFILL_CHUNK, PREFILL_CHUNK, Batcher, Reply
from deltamem.server.http import ClosingStreamingResponse, FifoLock, Guard, error_response, in_threads
from deltamem.server.metrics import Metrics
from deltamem.server.prefix import USER, PrefixCache

log = logging.getLogger(__name__)


def drain(steps: Generator[None, None, Any]) -> Any:
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as e:
            return e.value

def create_app(engine, store=None, model_name: str = "deltamem", api_key: str | Sequence[str] | None = None,
               max_prompt_tokens: int = 131072, cache_bytes: int | None = None, state_every: int = 4096,
               prefix_cache: bool = True, batch_decode: bool | None = None, guided_calls: bool = True,
               share_prefixes: bool = False, store_bytes: int | None = None,
               prefill_chunk: int | None = None) -> FastAPI:  # fmt: skip
    """api_key: one key or several, each a tenant: a session name (X-Deltamem-Session or `user`) is the key's own,
    and prefix states serve only the session that made them (share_prefixes: the states in memory serve every
    session, for an operator whose clients trust each other). store_bytes: the stored states' budget in the
    memory database (None: no limit; server/prefix.py). state_every: inside a long prompt, a state is also kept
    every this many tokens (a later prompt sharing only the beginning still hits). cache_bytes: the hot states'
    budget on the model's device (default: 8 states, at least 512 MiB; on a GPU at most half of its free memory).
    batch_decode: continuous batching (server/batching.py): concurrent replies decoded in one batch, prompts read
    `prefill_chunk` tokens at a time between its steps (batching's default: on a GPU, where a step costs about the
    same for one reply or many; prefill_chunk's: 512, on a GPU 2048). guided_calls: where tools are offered, a tool
    call the model opens can only be a well-formed call of one of them (agent/guide.py)."""
    if engine.tokenizer is None:
        raise ValueError("serving needs a model with a tokenizer")
    if cache_bytes is None:
        cache_bytes = max(512 << 20, 8 * engine.state_bytes())
        if engine.device.type == "cuda":
            cache_bytes = min(cache_bytes, torch.cuda.mem_get_info(engine.device)[0] // 2)
    keys = [api_key] if isinstance(api_key, str) else list(api_key or ())
    tenants = {f"Bearer {k}": hashlib.sha256(k.encode()).hexdigest()[:12] for k in keys}
    lock = FifoLock()
    metrics = Metrics()
    cache = PrefixCache(engine, store if prefix_cache else None, cache_bytes, enabled=prefix_cache,
                        share=share_prefixes, store_bytes=store_bytes, metrics=metrics)  # fmt: skip
    batched = engine.device.type == "cuda" if batch_decode is None else batch_decode
    if prefill_chunk is None:
        prefill_chunk = GPU_PREFILL_CHUNK if engine.device.type == "cuda" else PREFILL_CHUNK
    batcher = Batcher(engine, lock, chunk=prefill_chunk, metrics=metrics) if batched else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # states kept but not yet written; in a thread, as the writer may wait for a graph capture, under the
        # engine's lock held by a reply that is being cancelled, whose generator closes from this event loop
        await anyio.to_thread.run_sync(cache.close)
        if batcher is not None:
            await anyio.to_thread.run_sync(batcher.close)

    app = FastAPI(title="deltamem", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.prefixes = cache  # its flush() waits until the states kept so far are stored
    app.state.metrics = metrics
    bodies.document(app, model_name, max_prompt_tokens)  # /openapi.json: the request bodies (server/bodies.py)
    app.state.stopping = lambda: False  # the server running the app says when it is shutting down (app.py: serve)
    engine.reset()
    template = ChatTemplate.for_tokenizer(engine.tokenizer)
    eos = stop_ids(engine)

    app.add_middleware(Guard, tenants=tenants)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        log.info("%s %s %d %s", request.method, request.url.path, exc.status, exc)
        if request.method == "POST":  # a completion refused before it began
            metrics.requests.labels(str(exc.status)).inc()
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(ApiError(404, f"no route {request.url.path}", "not_found_error"))
        if exc.status_code == 405:
            return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics_text() -> Response:
        """Prometheus' text format (server/metrics.py); with API keys, a scraper sends one too."""
        return Response(metrics.render(), media_type=metrics.content_type)

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "deltamem"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict:
        if model_id != model_name:
            raise ApiError(404, f"model {model_id[:100]!r} is not served here", "not_found_error", "model")
        return card

    async def body_of(request: Request) -> dict:
        return api.read_body(await request.body(), model_name)

    def chat_prompt(body: dict) -> tuple[str, dict[str, dict], ReplyGuide | None]:
        messages, offer = api.chat_messages(body.get("messages")), api.offer_of(body)
        turn = prepare_turn(engine, template, messages, offer, eos, guided_calls)
        try:
            text = template.render(turn.messages)
        except TemplateError as e:
            raise ApiError(400, f"the model's chat template refused these messages: {e}") from None
        return text, turn.schemas, turn.guide

    def afresh() -> None:
        """After a failure mid-way the state is no longer what the cache thinks: the next request starts afresh."""
        engine.reset()
        cache.consumed([])

    def tokens(text: str) -> list[int]:
        """The prompt's ids, checked before anything is sent (a stream's errors too come as an HTTP status)."""
        ids = engine.tokenizer.encode(text)
        if not ids:
            raise ApiError(400, "the prompt is empty")
        if len(ids) > max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {max_prompt_tokens}")
        return ids

    def read(ids: list[int], session: str, chunk: Callable[[], int]) -> Generator[None, None, int]:
        """Holding the engine: restore the longest cached prefix, then feed the rest but the last token (generate()
        or the decode batch feeds that one) chunk() tokens at a time, yielding after each (the batcher decodes a
        step between two); a state is kept every `state_every` tokens and at the end. Returns the tokens the
        restored state held."""
        try:
            hit = cache.restore_longest(ids, session)
            at = saved = hit.tokens
            while at < len(ids) - 1:
                step = min(len(ids) - 1, at + chunk())
                engine.feed(ids[at:step], logits="none")
                at = step
                cache.consumed(ids[:at])
                if at - saved >= state_every or at == len(ids) - 1:
                    cache.save(session)
                    saved = at
                if at < len(ids) - 1:
                    yield
        except BaseException:
            afresh()
            raise
        return hit.tokens

    def prompt_job(ids, session, sample, choices, limit) -> Generator[None, None, tuple[int, list[Reply], list]]:
        """The scheduler's job for a request: read its prompt a chunk at a time, then its first token's logits; the
        n replies join the decode batch, each with a copy of the prompt's state. Returns (cached tokens, replies,
        their text iterators)."""
        # --prefill-chunk tokens between two decode steps; with no reply decoding, the engine's own chunk (4096 on
        # a GPU: larger matmuls)
        cached = yield from read(ids, session, lambda: batcher.chunk if batcher.busy() else
                                 max(batcher.chunk, engine.prefill_chunk))  # fmt: skip
        try:
            logits = engine.feed(ids[-1:], logits="last")[-1]
        except BaseException:
            afresh()
            raise
        cache.consumed(ids)
        guides = [sample["guide"]] + [sample["guide"] and sample["guide"].fresh() for _ in choices[1:]]
        replies = [Reply(engine.keep(), logits, c["sampler"], TextStream(engine.tokenizer, sample["stop"]),
                         set(eos), limit, guide=g) for c, g in zip(choices, guides, strict=True)]  # fmt: skip
        return cached, replies, [batcher.submit(r) for r in replies]

    def answer(ids: list[int], sample: dict, session: str, done: dict) -> Iterator[tuple[int, str] | None]:
        """Read the prompt (restoring the longest cached prefix), yield None once it is read, then (choice, text
        piece) for each of the n choices, one choice after the other; `done` gets ids, cached and, per choice, its
        sampler, n (tokens generated) and stopped_by. The states kept go to the cache, whose writer stores them;
        the engine is left with the last choice's."""
        choices = done["choices"] = [{"sampler": sampler_for(sample, k), "n": 0, "stopped_by": "length"}
                                     for k in range(sample["n"])]  # fmt: skip
        limit = sample["max_new_tokens"] or max(1, max_prompt_tokens - len(ids))  # default: what the context leaves
        if batcher is None:  # the replies decoded on the engine, which they hold meanwhile
            with lock:
                cached = drain(read(ids, session, lambda: state_every))
                done.update(ids=ids, cached=cached)
                yield None
                kept = engine.keep() if len(choices) > 1 else None  # each choice starts from the prompt's state
                for k, choice in enumerate(choices):
                    if k:
                        engine.restore_kept(kept)
                        cache.consumed(ids[:-1])
                    try:
                        for piece in engine.generate(ids[-1:], limit, stop=sample["stop"], stop_ids=eos,
                                                     guide=sample["guide"], sampler=choice["sampler"]):  # fmt: skip
                            yield k, piece
                    except GeneratorExit:  # a client that went away: generate() stopped with the state holding these
                        cache.consumed(ids + engine.generated)
                        choice.update(n=len(engine.generated))
                        raise
                    except BaseException:
                        afresh()
                        raise
                    choice.update(n=len(engine.generated), stopped_by=engine.stopped_by, ended=True)
                cache.consumed(ids + engine.generated)
                cache.save(session)
            return
        # continuous batching: the prompt is read on the scheduler's thread between decode steps of other replies
        cached, replies, pieces = batcher.run(prompt_job(ids, session, sample, choices, limit)).wait()
        done.update(ids=ids, cached=cached, replies=replies)
        try:  # all decode at once (since the job ended); their text is read one after the other
            yield None
            for k, (reply, choice) in enumerate(zip(replies, choices, strict=True)):
                for piece in pieces[k]:
                    yield k, piece
                choice.update(n=len(reply.generated), stopped_by=reply.stopped_by, ended=True)
        finally:
            for r, choice in zip(replies, choices, strict=True):  # a client that left: the replies not yet read end too
                r.cancelled = r.final is None
                if not choice.get("ended"):
                    choice["n"] = len(r.generated)
        cache.save_kept(session, ids + replies[-1].generated, replies[-1].final)  # the engine is not involved

    def sampler_for(sample: dict, k: int) -> Sampler:
        seed = None if sample["seed"] is None else sample["seed"] + k  # choices differ, each reproducible
        return Sampler(sample["temperature"], sample["top_p"], 0, seed, presence_penalty=sample["presence_penalty"],
                       frequency_penalty=sample["frequency_penalty"], logit_bias=sample["logit_bias"],
                       logprobs=sample["logprobs"])  # fmt: skip

    def usage(done: dict) -> dict:
        return api.usage(len(done["ids"]), sum(c["n"] for c in done["choices"]), done["cached"])

    def logprobs(choice: dict, upto: int, chat: bool, offset: int = 0) -> dict | None:
        """The log-probabilities of the choice's tokens not yet given (up to its upto-th generated token; an end
        of sequence has none), OpenAI-shaped; None where the request asked for none."""
        records = choice["sampler"].records
        if choice["sampler"].logprobs is None:
            return None
        given, choice["given"] = choice.get("given", 0), max(upto, choice.get("given", 0))
        new = [r for r in records[given:upto] if r[0] not in eos]
        return api.logprobs_of(new, lambda i: engine.tokenizer.decode_bytes([i]), chat, offset)

    def session_of(request: Request, body: dict) -> str:
        """The request's session within its tenant (the API key's: another key's session of the same name is
        another session): the one X-Deltamem-Session names, else "user:" and OpenAI's `user`, else "default"."""
        named, user = request.headers.get("x-deltamem-session"), body.get("user")
        tenant = f"{request.state.tenant}/" if request.state.tenant else ""
        if named:
            if named.startswith(USER):
                raise ApiError(400, f"X-Deltamem-Session may not start with {USER!r} (the `user` field's sessions)")
            return tenant + named[:100]
        return USER + tenant + str(user)[:100] if user else tenant + "default"

    def access(rid: str, session: str, done: dict, how: str) -> None:
        """The access log: one line a request (`deltamem serve --log-level info`, the default)."""
        first, t0, total = done.get("first"), done["t0"], time.perf_counter() - done["t0"]
        prompt, cached = len(done.get("ids") or ()), done.get("cached", 0)
        completion = sum(c["n"] for c in done.get("choices", ()))
        log.info("%s session=%s prompt=%d cached=%d completion=%d ttft=%s total=%.2fs %s", rid, session, prompt,
                 cached, completion, "-" if first is None else f"{first - t0:.2f}s", total, how)  # fmt: skip
        status = how.split(None, 1)[0].rstrip(",")
        metrics.request(int(status) if status.isdigit() else 500, prompt, cached, completion,
                        None if first is None else first - t0, total)  # fmt: skip

    def complete(text: str, body: dict, session: str, chat: bool, schemas: dict, guide=None,
                 left: threading.Event | None = None) -> Any:  # fmt: skip
        """The request's answer, whole or as a stream; `left` is set when a client waiting for a whole answer goes
        away: its generation stops at the next token."""
        t0 = time.perf_counter()
        if body.get("stream") is not None and not isinstance(body["stream"], bool):  # 1, "yes": 400, as OpenAI
            raise ApiError(400, "stream must be true or false", param="stream")
        sample = {**api.sampling(body, chat, max_prompt_tokens), "guide": guide,
                  "parallel": body.get("parallel_tool_calls") is not False}
        ids = tokens(text)
        if sample["logit_bias"] and max(sample["logit_bias"]) >= engine.config.vocab_size:
            raise ApiError(400, f"logit_bias: token ids go from 0 to {engine.config.vocab_size - 1}",
                           param="logit_bias")  # fmt: skip
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        echo = text if sample["echo"] else ""
        if body.get("stream"):
            replies = stream(ids, sample, session, chat, schemas, created, rid, api.wants_usage(body), t0, echo)
            return ClosingStreamingResponse(in_threads(replies, lambda: app.state.stopping()),
                                            media_type="text/event-stream")
        done: dict = {"t0": t0}
        pieces = [[] for _ in range(sample["n"])]
        with contextlib.closing(answer(ids, sample, session, done)) as items:
            for item in items:
                if left is not None and left.is_set():  # closing the generator frees the engine at once
                    break
                if item is not None:
                    done.setdefault("first", time.perf_counter())
                    pieces[item[0]].append(item[1])
        if left is not None and left.is_set():
            access(rid, session, done, "200, the client left")
            return None
        access(rid, session, done, "200")
        choices = [api.choice(k, echo + "".join(pieces[k]), api.finish_reason(c["stopped_by"]), chat, schemas,
                              logprobs(c, c["n"], chat, len(echo)), sample["parallel"])
                   for k, c in enumerate(done["choices"])]  # fmt: skip
        return api.completion(rid, created, model_name, choices, usage(done), chat)

    def stream(ids, sample, session, chat, schemas, created, rid, with_usage: bool, t0: float, echo: str
               ) -> Iterator[str]:  # fmt: skip
        def chunk(k: int, delta: dict | str, reason: str | None = None, lp: dict | None = None) -> str:
            return api.chunk(rid, created, model_name, chat, delta, reason, index=k, logprobs=lp)

        def made(k: int) -> int:  # tokens the choice has generated so far
            if choices[k].get("ended"):
                return choices[k]["n"]
            return len(engine.generated) if batcher is None else len(replies[k].generated)

        done: dict = {"t0": t0}
        how = "200, the client left"
        try:
            pieces_of = answer(ids, sample, session, done)
            try:
                next(pieces_of)  # the prompt is read
            except ApiError as e:
                how = f"{e.status} {e}"
                yield api.error_event(e)
                yield "data: [DONE]\n\n"
                return
            replies = done.get("replies")
            texts, sent = [echo] * sample["n"], [0] * sample["n"]

            def text_out(k: int, upto: int) -> Iterator[str]:
                if upto > sent[k]:
                    piece, lp = texts[k][sent[k] : upto], logprobs(choices[k], made(k), chat, sent[k])
                    yield chunk(k, {"content": piece} if chat else piece, None, lp)
                    sent[k] = upto

            def calls_out(k: int, final: bool = False) -> Iterator[str]:
                for delta in calls[k].deltas(texts[k], final):
                    yield chunk(k, {"tool_calls": [delta]})

            def finish(k: int) -> Iterator[str]:
                """The choice's end: its calls (where tools were offered) or the rest of its text, then its reason."""
                reason = api.finish_reason(choices[k]["stopped_by"])
                message, called = api.assistant_message(texts[k], schemas, sample["parallel"])
                if calls is not None and (called or calls[k].sent):  # the rest of the calls streamed so far
                    yield from calls_out(k, final=True)
                elif called:  # unguided calls: all at once, once parsed
                    yield chunk(k, {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]})
                else:
                    yield from text_out(k, len(texts[k]))
                rest = logprobs(choices[k], choices[k]["n"], chat, sent[k])  # tokens no text chunk carried
                if rest and (rest.get("content") or rest.get("tokens")):
                    yield chunk(k, {"content": ""} if chat else "", None, rest)
                reason = "tool_calls" if called else reason
                yield chunk(k, {} if chat else "", reason)

            choices = done["choices"]
            # guided calls stream as they are decoded: name, then arguments in fragments
            calls = ([api.CallStream(schemas, sample["parallel"]) for _ in choices]
                     if schemas and sample["guide"] is not None else None)  # fmt: skip
            if chat:
                for k in range(sample["n"]):
                    yield chunk(k, {"role": "assistant", "content": ""})
            current = 0
            for k, piece in pieces_of:
                done.setdefault("first", time.perf_counter())
                while current < k:  # the choices before this one have ended
                    yield from finish(current)
                    current += 1
                texts[k] += piece
                # with tools offered, text streams as it comes but for what may open a call
                yield from text_out(k, api.releasable(texts[k]) if schemas else len(texts[k]))
                if calls is not None:
                    yield from calls_out(k)
            while current < sample["n"]:
                yield from finish(current)
                current += 1
            if with_usage:  # as OpenAI: its own chunk, when asked
                yield api.usage_chunk(rid, created, model_name, chat, usage(done))
            yield "data: [DONE]\n\n"
            how = "200"
        finally:
            access(rid, session, done, how)

    async def answered(request: Request, *args) -> Any:
        """complete(*args) in a thread, told when the client goes away before a whole answer is ready."""
        left = threading.Event()
        work = asyncio.ensure_future(run_in_threadpool(complete, *args, left))
        try:
            while not (await asyncio.wait({work}, timeout=0.2))[0]:
                if await request.is_disconnected() or app.state.stopping():
                    left.set()
        except asyncio.CancelledError:  # the server is shutting down: the generation stops too
            left.set()
            raise
        return await work

    @app.post("/v1/chat/completions", responses=bodies.ERRORS,
              openapi_extra=bodies.request_body(bodies.ChatCompletionRequest))  # documented; api.py checks it
    async def chat_completions(request: Request):
        body = await body_of(request)
        text, schemas, guide = chat_prompt(body)
        return await answered(request, text, body, session_of(request, body), True, schemas, guide)

    @app.post("/v1/completions", responses=bodies.ERRORS,
              openapi_extra=bodies.request_body(bodies.CompletionRequest))
    async def completions(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        return await answered(request, prompt, body, session_of(request, body), False, {}, None)

    return app

"""The HTTP plumbing under server/app.py's routes: errors as responses, a lock granted in request order, blocking
generators streamed from the thread pool and closed however a stream ends, and the Guard (API key, body size)."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
from fastapi.responses import JSONResponse, StreamingResponse

from deltamem.server.api import MAX_BODY, ApiError

SHUTTING_DOWN = {"error": {"message": "the server is shutting down", "type": "server_error"}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class FifoLock:
    """A lock granted in request order (a plain Lock lets a late thread overtake waiting ones)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        self.release()

    def try_acquire(self) -> bool:
        """Take the lock only if nobody holds it or waits for it."""
        with self._cond:
            if self._serving != self._next:
                return False
            self._next += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


async def in_threads(gen: Iterator[str], stopping: Callable[[], bool]) -> AsyncIterator[str]:
    """A blocking generator driven from the thread pool, one item at a time, and closed whatever ends the iteration:
    a client that left (Starlette cancels the response) or a server shutting down (`stopping()`: the stream ends
    with an error event) closes it at its current `yield`, which releases the engine lock at once and keeps no state
    of the partial reply. (Starlette's own wrapper of a sync iterator never closes it: an abandoned reply would hold
    the lock until garbage collection, if ever.)"""
    end = object()
    try:
        while (item := await anyio.to_thread.run_sync(next, gen, end)) is not end:
            if stopping():
                yield f"data: {json.dumps(SHUTTING_DOWN)}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield item
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(gen.close)


class ClosingStreamingResponse(StreamingResponse):
    """A stream whose body iterator is closed when the response ends, sent or not (a disconnect may cancel the
    response while the iterator waits at a `yield`, where no exception reaches it)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class Guard:
    """The API key (its tenant into request.state.tenant; /health needs none) and the body size limit, checked before
    a route runs. Plain ASGI (not Starlette's BaseHTTPMiddleware, under which a route's request.is_disconnected()
    blocks instead of answering)."""

    def __init__(self, app, tenants: dict[str, str]):
        self.app, self.tenants = app, tenants

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        tenant = ""
        if self.tenants and scope["path"] != "/health":
            tenant = self.tenants.get(headers.get("authorization", ""))
            if tenant is None:
                error = ApiError(401, "invalid or missing API key", "authentication_error")
                return await error_response(error)(scope, receive, send)
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return await error_response(ApiError(413, f"request body over {MAX_BODY} bytes"))(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

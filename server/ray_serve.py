"""`deltamem serve --ray --replicas N`: N servers behind Ray Serve's HTTP proxy, the same OpenAI API, each session's
requests on one replica.

Two deployments. `Replica` loads the model and runs the whole `deltamem serve` app (server/app.py) on its node's
loopback, in a thread of its own; its `forward` relays one HTTP request to that app and streams the answer back
(status and headers first, then the body as it comes: SSE streams stay streams). `Router` is the HTTP entry: it
reads the request's session as the app will (the X-Deltamem-Session header, else the body's `user`, each within the
tenant of its API key) and calls a replica with that session as Ray Serve's multiplexed model id, so Ray routes the
session's requests to the replica that already holds it (its hot prefix states), and spreads new sessions over the
replicas. A replica that dies is replaced by Ray; its sessions go to another, which restores them from the memory
database: for that, every replica must share one memory (`--db postgresql://...` and `--objects s3://...`; a SQLite
file only works for replicas on one machine, one writer at a time). Each answer says which replica gave it
(`X-Deltamem-Replica`: host and process id).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import StreamingResponse

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
MAX_SESSIONS = 10_000  # sessions a replica is routed (Ray's multiplexing LRU); their states live in the app's budget


def session_key(headers: dict[str, str], body: bytes, tenanted: bool) -> str:
    """The session the app will file this request under (server/app.py's session_of: the X-Deltamem-Session name,
    else "user:" and the body's `user`, else "default"; within the API key's tenant where keys are set): the routing
    key."""
    named = headers.get("x-deltamem-session")
    if named:
        name = named[:100]
    else:
        try:
            user = json.loads(body).get("user") if body else None
        except (ValueError, AttributeError):
            user = None
        name = f"user:{str(user)[:100]}" if user else "default"
    tenant = hashlib.sha256(headers.get("authorization", "").encode()).hexdigest()[:12] if tenanted else "-"
    return f"{tenant}/{name}"


# Requests a replica (and the router) takes at once. Ray's default (5) would send a busy session's next request to
# another replica, which then waits for the session's lease: a session must stay where it is, so its requests queue
# in its replica's app (whose engine serves them in turn, or batched), never elsewhere.
MAX_ONGOING = 1000


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
class Replica:
    """One `deltamem serve` app (its model, its memory store) on this node's loopback."""

    def __init__(self, args: argparse.Namespace):
        import httpx
        import uvicorn

        from deltamem.cli.options import load
        from deltamem.cli.serve import UVICORN, build_app
        from deltamem.memory.store import Store
        from deltamem.server.launch import free_port

        engine = load(args)
        self.store = Store(args.db, objects=args.objects)
        app, _ = build_app(args, engine, self.store)
        self.prefixes = app.state.prefixes
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **UVICORN))
        app.state.stopping = lambda: self.server.should_exit
        self.thread = threading.Thread(target=self.server.run, name="deltamem-replica", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the replica's server did not start (its port taken?)")
            time.sleep(0.05)
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose server thread died is replaced."""
        if not self.thread.is_alive():
            raise RuntimeError("the replica's server has stopped")

    @serve.multiplexed(max_num_models_per_replica=MAX_SESSIONS)
    async def session(self, key: str) -> str:
        return key  # nothing to load: the app restores a session's states from the memory database itself

    async def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> AsyncIterator:
        """The app's answer to this request: first {"status", "headers"}, then the body's chunks as they come."""
        await self.session(serve.get_multiplexed_model_id())
        async with self.client.stream(method, path, headers=headers, content=body) as r:
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
            yield {"status": r.status_code, "headers": {**out, "x-deltamem-replica": self.name}}
            async for chunk in r.aiter_raw():
                yield chunk

    def __del__(self):  # scaled down or shut down: the app writes the states it kept, then gives its leases back
        server = getattr(self, "server", None)
        if server is not None:
            server.should_exit = True
            self.thread.join(timeout=30)
            self.prefixes.close()  # (the app's shutdown did, unless it is still at it) before the store closes
            self.store.close()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
class Router:
    """The HTTP entry: each request to the replica that holds its session."""

    def __init__(self, replica: DeploymentHandle, tenanted: bool):
        self.replica, self.tenanted = replica, tenanted

    async def __call__(self, request: Request) -> StreamingResponse:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        stream = self.replica.options(multiplexed_model_id=session_key(headers, body, self.tenanted), stream=True)
        answer = stream.forward.remote(request.method, path, headers, body)
        head = await answer.__anext__()

        async def rest() -> AsyncIterator[bytes]:
            async for chunk in answer:
                yield chunk

        return StreamingResponse(rest(), status_code=head["status"], headers=head["headers"])


def run(args: argparse.Namespace) -> int:
    """Start (or join, with $RAY_ADDRESS) a Ray cluster, deploy the router and the replicas, serve until SIGTERM or
    Ctrl-C, then take the deployment down."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="warning",
             configure_logging=False)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        # a replica a GPU where the cluster has them (Ray hides the GPUs from an actor that asks for none)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        replicas = Replica.options(num_replicas=args.replicas, ray_actor_options={"num_cpus": 0, "num_gpus": gpus})
        replicas = replicas.bind(args)
        serve.run(Router.bind(replicas, bool(args.api_key)), name="deltamem", route_prefix="/")
        print(f"deltamem serve: {args.replicas} replica(s) behind Ray Serve on http://{args.host}:{args.port}/v1",
              file=sys.stderr)  # fmt: skip
        stop.wait()
    finally:
        if os.environ.get("RAY_ADDRESS"):  # a cluster of others too: only this application goes
            serve.delete("deltamem")
        else:
            serve.shutdown()
        ray.shutdown()
    return 0

"""`deltamem serve --ray` with 1 and 2 replicas over one PostgreSQL database (a server on this machine from Debian's
binaries, fsync on) and one object store (a folder), the default model on the CPU, side by side in one run.

Per replica count: tokens a second served to C concurrent sessions (each opened with one turn first, then timed over
T more turns of its growing conversation, all sessions at once, greedy; the decode step not compiled);
sessions a second resumed (after a restart of the whole deployment, each session's next turn with one new token:
its state loaded from the store, `cached_tokens` checked); and, with 2 replicas, the time a session's next answer
takes once its replica is killed (another replica leases it and restores its state) against the same turn's time
before. Bytes a turn writes to each backend: benchmarks/objects.py.

    python benchmarks/scale.py [--sessions 4] [--turns 3] [--max-tokens 32]

Writes benchmarks/results/scale_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from common import write_results

from deltamem.server.launch import Served

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repo: tests.postgres (last: no shadowing)
from tests.postgres import create_database, postgres_server  # noqa: E402


def ask(client, convo: list[dict], user: str, max_tokens: int) -> tuple:
    """(reply, replica, seconds); a dead replica's request retried until Ray has routed the session elsewhere."""
    t0 = time.perf_counter()
    while True:
        try:
            raw = client.chat.completions.with_raw_response.create(model="default", messages=convo, user=user,
                                                                  max_tokens=max_tokens, temperature=0)  # fmt: skip
            return raw.parse(), raw.headers["x-deltamem-replica"], time.perf_counter() - t0
        except (openai.InternalServerError, openai.APIConnectionError):
            if time.perf_counter() - t0 > 300:
                raise
            time.sleep(0.5)


def converse(client, convo: list[dict], user: str, turns: int, max_tokens: int) -> tuple[list[dict], int, str]:
    tokens, replica = 0, ""
    for t in range(turns):
        reply, replica, _ = ask(client, convo, user, max_tokens)
        tokens += reply.usage.completion_tokens
        convo += [{"role": "assistant", "content": reply.choices[0].message.content},
                  {"role": "user", "content": f"Go on ({t})."}]  # fmt: skip
    return convo, tokens, replica


def run(replicas: int, url: str, env: dict, args) -> dict:
    serve = ("--ray", "--replicas", str(replicas), "--model", "default", "--db", url)
    users = [f"r{replicas}s{i}" for i in range(args.sessions)]
    with Served(*serve, env=env, timeout=600) as server:
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=600)
        opening = [[{"role": "user", "content": f"I am {u}. Explain how a recurrent state can replace a long context."}]
                   for u in users]  # fmt: skip
        first = [converse(client, c, u, 1, args.max_tokens)[0] for c, u in zip(opening, users, strict=True)]
        t0 = time.perf_counter()  # each session opened (one turn each, in turn): now its next turns, all at once
        with ThreadPoolExecutor(len(users)) as pool:
            done = list(pool.map(lambda cu: converse(client, cu[0], cu[1], args.turns, args.max_tokens),
                                 zip(first, users, strict=True)))  # fmt: skip
        serve_s = time.perf_counter() - t0
        row = {"replicas": replicas, "sessions": len(users), "turns": args.turns,
               "tok_s": sum(t for _, t, _ in done) / serve_s,
               "replicas_used": len({r for _, _, r in done})}  # fmt: skip
    with Served(*serve, env=env, timeout=600) as server:  # restarted: every session's state is in the store
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=600)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(users)) as pool:
            resumed = list(pool.map(lambda cu: ask(client, cu[0], cu[1], 1), [(c, u) for (c, _, _), u in
                                                                               zip(done, users, strict=True)]))
        row["sessions_resumed_s"] = len(users) / (time.perf_counter() - t0)
        row["all_resumed_from_store"] = all(r.usage.prompt_tokens_details.cached_tokens > 0 for r, _, _ in resumed)
        if replicas > 1:  # a session moves: its replica killed, its next turn answered by another
            convo, user = done[0][0], users[0]
            _, replica, before_s = ask(client, convo, user, 1)
            os.kill(int(replica.rsplit(":", 1)[1]), signal.SIGKILL)
            reply, after, move_s = ask(client, convo, user, 1)
            row.update(turn_s_before=before_s, turn_s_after_kill=move_s, moved=after != replica,
                       restored=reply.usage.prompt_tokens_details.cached_tokens > 0)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, postgres_server(fsync=True) as server:
        env = {**os.environ, "DELTAMEM_OBJECTS": f"file://{Path(tmp) / 'objects'}", "DELTAMEM_LEASE_WAIT": "60",
               "DELTAMEM_COMPILE": "0"}  # no 40 s compile of the decode step in a replica's first answer
        for replicas in (1, 2):
            rows.append(run(replicas, create_database(server, f"scale{replicas}"), env, args))
            print(rows[-1], flush=True)
    write_results(
        "scale_cpu", rows, "`deltamem serve --ray`: 1 and 2 replicas over PostgreSQL + object storage "
        "(`benchmarks/scale.py`)",
        ["replicas", "sessions", "turns", "tok_s", "replicas_used", "sessions_resumed_s", "all_resumed_from_store",
         "turn_s_before", "turn_s_after_kill", "moved", "restored"],
        model="default", max_tokens=args.max_tokens, cpus=os.cpu_count(),
    )


if __name__ == "__main__":
    main()

"""`deltamem serve` measured as clients see it, with the official `openai` client against a real server process on
this machine (the default model unless --model): time to the first streamed token of a conversation's first turn
(its prompt read whole), of its next turn (the prefix state restored, only the new part fed), and of that next turn
after a server restart (the state from the SQLite store); then aggregate decode tok/s with 1, 4 and 16 concurrent
clients (requests are served one at a time: no batching yet).

    python benchmarks/serve.py [--model default] [--context-chars 6000]

Writes benchmarks/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import RESULTS, ROOT, corpus_text, device_name, versions


def start(model: str, db: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "serve", "--model", model, "--port", str(port), "--db", str(db)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return p, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def first_token(client, messages: list[dict], max_tokens: int = 16) -> tuple[float, str, int]:
    """Seconds to the first streamed content, the whole reply, and the cached prompt tokens."""
    t0 = time.perf_counter()
    ttft, text, cached = None, "", 0
    for ch in client.chat.completions.create(
        model=client.model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if ch.choices and ch.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        text += (ch.choices[0].delta.content or "") if ch.choices else ""
        if getattr(ch, "usage", None) and ch.usage.prompt_tokens_details:
            cached = ch.usage.prompt_tokens_details.cached_tokens
    return ttft if ttft is not None else time.perf_counter() - t0, text, cached


def main() -> None:
    import openai

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--context-chars", type=int, default=6000)
    ap.add_argument("--tokens", type=int, default=32, help="max tokens per concurrent request")
    args = ap.parse_args()
    db = Path(tempfile.mkdtemp()) / "serve.db"
    proc, url = start(args.model, db)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    client.model = client.models.list().data[0].id
    context = corpus_text(args.context_chars)[: args.context_chars]
    convo = [
        {"role": "system", "content": "You answer questions about this code.\n\n" + context},
        {"role": "user", "content": "What does the first function do?"},
    ]
    rows: dict = {}
    t, reply, cached = first_token(client, convo)
    rows["turn 1 (prompt read whole)"] = {"ttft_s": t, "cached_tokens": cached}
    convo += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the second one?"}]
    t, _, cached = first_token(client, convo)
    rows["turn 2 (prefix restored)"] = {"ttft_s": t, "cached_tokens": cached}
    proc.terminate()
    proc.wait()
    proc, url = start(args.model, db)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    client.model = client.models.list().data[0].id
    t, _, cached = first_token(client, convo)
    rows["turn 2 after a restart (state from SQLite)"] = {"ttft_s": t, "cached_tokens": cached}
    conc = {}
    for n in (1, 4, 16):
        done: list[int] = []

        def one(i: int, done: list[int] = done) -> None:
            r = client.chat.completions.create(
                model=client.model,
                max_tokens=args.tokens,
                temperature=0,
                messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            )
            done.append(r.usage.completion_tokens)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        conc[n] = {"requests": n, "completion_tokens": sum(done), "wall_s": wall, "tok_s": sum(done) / wall}
    proc.terminate()
    proc.wait()
    doc = {"device": device_name(), "versions": versions(), "model": args.model, "turns": rows, "concurrency": conc}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# `deltamem serve` as clients see it",
        "",
        f"{doc['device']}; model {args.model}; `python benchmarks/serve.py` (the `openai` client, streaming).",
        "",
        "| request | time to first token s | cached prompt tokens |",
        "|---|---:|---:|",
        *(f"| {k} | {v['ttft_s']:.2f} | {v['cached_tokens']:,} |" for k, v in rows.items()),
        "",
        "| concurrent clients | completion tokens | wall s | aggregate tok/s |",
        "|---:|---:|---:|---:|",
        *(f"| {n} | {v['completion_tokens']} | {v['wall_s']:.1f} | {v['tok_s']:.1f} |" for n, v in conc.items()),
        "",
        "Requests are served one at a time in arrival order: the aggregate rate is one stream's.",
    ]
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

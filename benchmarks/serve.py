"""`deltamem serve` measured as clients see it: the official `openai` client against real server processes.

1. A multi-turn agent transcript is replayed (--turns turns; each turn the user asks about a standard-library file,
   the assistant calls read_file and the tool result, the file's text, joins the conversation: 50k+ tokens over 32
   turns by default). Every turn re-sends the whole conversation, as agent tools do, and the time to the first
   streamed token is measured:
   - with the prefix state cache (the server restarted once mid-transcript: the states come back from SQLite),
   - with it turned off (`deltamem serve --no-prefix-cache`: each prompt read whole, what a Gated DeltaNet hybrid
     gets from vLLM's prefix cache today), on every --baseline-every-th turn (every turn on a GPU).
   The cache's hit rate is cached prompt tokens over prompt tokens.
2. Aggregate decode tok/s with 1, 4 and 16 concurrent clients, with the replies decoded together in one batch
   (`--batch-decode`) and one after the other (`--no-batch-decode`), side by side on the same server build.

    python benchmarks/serve.py [--model default] [--device auto] [--dtype auto] [--turns 32] [--out DIR]

Writes serve_cpu.{json,md} or serve_gpu.{json,md} (by the device the server runs on) to --out (default
benchmarks/results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import RESULTS, device_name, versions

from deltamem.server.launch import Served


class Server(Served):
    """`deltamem serve` of --model on --device in a subprocess (server/launch.py); its stderr goes to `log`."""

    def __init__(self, args: argparse.Namespace, db: Path, log: Path, *extra: str):
        import openai

        try:
            super().__init__("--model", args.model, "--device", args.device, "--dtype", args.dtype, "--db", str(db),
                             *extra, log=log)  # fmt: skip
        except RuntimeError as e:
            raise SystemExit(f"the server did not start ({e}); see {log}") from None
        self.client = openai.OpenAI(base_url=self.url, api_key="-", max_retries=0, timeout=3600)
        self.model = self.client.models.list().data[0].id

    def counters(self) -> dict[str, float]:
        """The server's GET /metrics (server/metrics.py): each counter's value, by name and labels."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=60) as r:
            text = r.read().decode()
        return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) if f.type == "counter" for s in f.samples
                if s.name.endswith("_total")}  # fmt: skip

    def first_token(self, messages: list[dict], max_tokens: int = 8) -> dict:
        """Seconds to the first streamed content, and the usage the server reports."""
        t0 = time.perf_counter()
        ttft, usage = None, None
        for ch in self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ):  # fmt: skip
            if ch.choices and ch.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - t0
            if getattr(ch, "usage", None):
                usage = ch.usage
        return {
            "ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens,
        }



def transcript(turns: int, result_chars: int) -> list[tuple[list[dict], list[dict]]]:
    """(user message, what follows the reply: the assistant's read_file call and its result) per turn."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(stdlib.glob("*.py")) if f.stat().st_size >= result_chars][:turns]
    out = []
    for i, f in enumerate(files):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps({"path": f.name})}}  # fmt: skip
        out.append((
            [{"role": "user", "content": f"What does {f.name} provide? Read it first."}],
            [{"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": f"call_{i}", "content": f.read_text(errors="replace")[:result_chars]}],
        ))  # fmt: skip
    return out


SYSTEM = {"role": "system", "content": "You are a coding agent. Call read_file to read a file; answer briefly."}


def replay(args, db: Path, log: Path, turns, cached: bool) -> list[dict]:
    """Each turn's time to first token; with the cache the server is restarted before turn --restart-at."""
    server = Server(args, db, log, *([] if cached else ["--no-prefix-cache"]))
    rows, history = [], [SYSTEM]
    try:
        for i, (ask, after) in enumerate(turns, 1):
            if cached and i == args.restart_at:
                server.stop()
                server = Server(args, db, log)
            if cached or i % args.baseline_every == 0 or i == len(turns):
                r = server.first_token(history + ask)
                r |= {"turn": i, "after_restart": cached and i == args.restart_at}
                rows.append(r)
                print(f"{'cached' if cached else 'uncached'} turn {i}: {r}", file=sys.stderr, flush=True)
            history += ask + after
    finally:
        server.stop()
    return rows


def prompts(n: int, chars: int) -> list[str]:
    """n distinct prompts of about chars characters (slices of standard-library files): no two share a prefix."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(f.read_text(errors="replace") for f in sorted(stdlib.glob("*.py"))[:80])
    return [f"Summarise this code.\n\n{text[i * chars : (i + 1) * chars]}" for i in range(n)]


def rank(values: list[float], q: float) -> float:
    """The q-quantile of sorted values by the nearest rank (of 2 values the 95th percentile is the larger)."""
    return values[max(0, math.ceil(q * len(values)) - 1)]


def ttft_floor(clients: int, ramp: float, read_s: float) -> float:
    """The p95 time to first token that reading the prompts alone allows: clients arriving as the benchmark's do
    (spread evenly over `ramp` s), each prompt read in `read_s` s, one after the other on one device (a GPU reads a
    2k-token prompt at 7B shapes near its peak rate already: reading several at once would not be faster)."""
    free, waits = 0.0, []
    for i in range(clients):
        arrive = ramp * i / clients
        free = max(free, arrive) + read_s
        waits.append(free - arrive)
    return rank(sorted(waits), 0.95)


def concurrency(args, db: Path, log: Path, batched: bool) -> dict:
    """Clients 1, 4 and 16 at once, each sending --requests streamed requests one after the other (a --prompt-chars
    prompt of its own, up to --tokens tokens, greedy): aggregate tok/s, time to first token, and the gaps between
    a stream's tokens (the longest is how long a running reply waited for other prompts)."""
    chunk = ["--prefill-chunk", str(args.prefill_chunk)] if args.prefill_chunk and batched else []
    server = Server(args, db, log, *(["--batch-decode", *chunk] if batched else ["--no-batch-decode"]))
    asks = prompts(16 * args.requests + 1, args.prompt_chars)
    out = {}

    def stream(text: str) -> dict:
        t0 = time.perf_counter()
        times, usage = [], None
        for ch in server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": text}], max_tokens=args.tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
        ):  # fmt: skip
            if ch.choices and ch.choices[0].delta.content:
                times.append(time.perf_counter() - t0)
            if getattr(ch, "usage", None):
                usage = ch.usage
        return {"ttft_s": times[0] if times else None, "gaps_s": [b - a for a, b in itertools.pairwise(times)],
                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}  # fmt: skip

    try:
        stream(asks[-1])  # untimed: lazy initialisation, kernel autotuning, the decode graph's capture
        for n in (1, 4, 16):
            rows: list[dict] = []

            def client(i: int, rows: list[dict] = rows, n: int = n) -> None:
                time.sleep(args.ramp * i / n)  # --ramp: the clients start spread over that many seconds
                for k in range(args.requests):
                    rows.append(stream(asks[i * args.requests + k]))

            before = server.counters()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            after = server.counters()  # where the server's time went meanwhile (its writer may still be behind)
            spent = {k.removeprefix("deltamem_"): round(v - before.get(k, 0.0), 3) for k, v in after.items()
                     if v != before.get(k, 0.0) and not k.startswith(("deltamem_requests", "deltamem_tokens"))}
            ttfts = sorted(r["ttft_s"] for r in rows if r["ttft_s"] is not None)
            gaps = sorted(g for r in rows for g in r["gaps_s"])
            tokens = sum(r["completion_tokens"] for r in rows)
            out[n] = {"requests": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows),
                      "completion_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                      "ttft_median_s": statistics.median(ttfts), "ttft_p95_s": rank(ttfts, 0.95),
                      "gap_p99_s": rank(gaps, 0.99) if gaps else None,
                      "gap_max_s": gaps[-1] if gaps else None, "server": spent}  # fmt: skip
            print(f"{'batched' if batched else 'one at a time'} {n} clients: {out[n]}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return out


def floors(batched: dict, ramp: float) -> list[str]:
    """A line on the p95 times to first token the prompt reads alone allow (ttft_floor), from the one-client batched
    run's prompt-read time (its scheduler's job seconds), beside the single client's own time to first token."""
    one = batched[1]
    read_s = one.get("server", {}).get("scheduler_seconds_total{work=job}", 0.0) / one["requests"]
    if not read_s:
        return []
    floor = {n: ttft_floor(n, ramp, read_s) for n in batched}
    parts = [f"{n} clients {f:.2f} s ({f / one['ttft_median_s']:.1f}x)" for n, f in floor.items()]
    return [f"The prompt reads alone (one client's read: {read_s:.3f} s, one after the other as the clients arrive) "
            f"allow a p95 time to first token of at least: {', '.join(parts)} (x: against one client's).", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--turns", type=int, default=32)
    ap.add_argument("--result-chars", type=int, default=7000, help="characters of each tool result (a file's head)")
    ap.add_argument("--restart-at", type=int, default=None, help="turn before which the server restarts")
    ap.add_argument("--baseline-every", type=int, default=None, help="uncached turns (default 1 on a GPU, 5)")
    ap.add_argument("--tokens", type=int, default=128, help="max tokens per concurrent request")
    ap.add_argument("--prompt-chars", type=int, default=8000, help="characters of each concurrent request's prompt "
                    "(about 2k tokens)")
    ap.add_argument("--requests", type=int, default=2, help="requests each concurrent client sends, one after another")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="the server's --prefill-chunk")
    ap.add_argument("--ramp", type=float, default=0.0, help="seconds over which the concurrent clients start, evenly "
                    "spread (default 0: all at once, the worst case for the time to first token)")
    ap.add_argument("--only-concurrency", action="store_true", help="skip the transcript (keep its earlier figures)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import torch

    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.restart_at = args.restart_at or args.turns // 2 + 1
    args.baseline_every = args.baseline_every or (1 if gpu else 5)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    log = work / "server.log"
    turns = transcript(args.turns, args.result_chars)
    name = "serve_gpu" if gpu else "serve_cpu"
    try:
        if args.only_concurrency:
            old = json.loads((args.out / f"{name}.json").read_text())
            cached, uncached = old["cached"], old["uncached"]
        else:
            cached = replay(args, work / "cached.db", log, turns, cached=True)
            uncached = replay(args, work / "uncached.db", log, turns, cached=False)
        conc = {m: concurrency(args, work / f"conc-{m}.db", log, m == "batched") for m in ("serial", "batched")}
    except BaseException:
        print(f"the servers' log is kept in {log}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)  # the stores hold GBs of states
    base = {r["turn"]: r for r in uncached}
    hit = sum(r["cached_tokens"] for r in cached) / sum(r["prompt_tokens"] for r in cached)
    later = [r["ttft_s"] for r in cached if r["turn"] > 1 and not r["after_restart"]]
    doc = {"device": device_name(), "versions": versions(),
           "model": Path(args.model).name, "turns": len(cached), "prompt_tokens_last": cached[-1]["prompt_tokens"],
           "hit_rate": hit, "cached": cached, "uncached": uncached, "concurrency": conc,
           "ttft_cached_median_s": statistics.median(later)}  # fmt: skip
    lines = [
        "# `deltamem serve` as clients see it: a replayed agent transcript",
        "",
        f"{doc['device']}; model {doc['model']}; `python benchmarks/serve.py` (the `openai` client, streaming, "
        f"{doc['turns']} turns, each a read_file call whose result is a file's first {args.result_chars:,} characters; "
        f"the last prompt is {doc['prompt_tokens_last']:,} tokens). The server restarted before turn "
        f"{args.restart_at}.",
        "",
        f"Prefix cache hit rate: {100 * hit:.1f}% of prompt tokens. Median time to first token, turns 2+ with the "
        f"cache: {doc['ttft_cached_median_s']:.2f} s.",
        "",
        "| turn | prompt tokens | cached tokens | TTFT with cache s | TTFT without (re-prefill) s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in cached:
        b = base.get(r["turn"])
        mark = " (after restart)" if r["after_restart"] else ""
        lines.append(f"| {r['turn']}{mark} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} | {r['ttft_s']:.2f} | "
                     f"{format(b['ttft_s'], '.2f') if b else '-'} |")  # fmt: skip
    lines += [
        "",
        f"Concurrent clients, each sending {args.requests} streamed requests one after the other (a prompt of "
        f"about {conc['serial'][1]['prompt_tokens']:,.0f} tokens of its own, up to {args.tokens} tokens, greedy; "
        + (f"the clients start spread over {args.ramp:g} s); " if args.ramp else "all starting at once); ")
        + "one at a time (`--no-batch-decode`) and continuous batching (`--batch-decode`: replies decoded together, "
        f"prompts read {args.prefill_chunk or (2048 if gpu else 512)} tokens at a time between the decode steps), "
        "side by side in one "
        "run. Wall time from the first request to the last reply; each request also keeps its states in the SQLite "
        "store. Gap: the time between two tokens of one stream (the longest is how long a running reply waited).",
        "",
        "| clients | mode | requests | tok/s | x one at a time | TTFT median s | TTFT p95 s | p95 / 1 client | "
        "gap p99 s | gap max s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {n} | {label} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / conc['serial'][n]['tok_s']:.2f}x | "
          f"{r['ttft_median_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['ttft_p95_s'] / runs[1]['ttft_median_s']:.1f}x | "
          f"{r['gap_p99_s'] or 0:.3f} | {r['gap_max_s'] or 0:.3f} |"
          for n in conc["serial"] for label, runs in (("one at a time", conc["serial"]), ("batched", conc["batched"]))
          for r in [runs[n]]),
        "",
        *(floors(conc["batched"], args.ramp) if args.requests == 1 else []),
        "Where the server's time went during each run (its GET /metrics, after minus before; seconds, except "
        "steps, tokens and states):",
        "",
        *(f"- {n} clients, {label}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(runs[n].get("server", {}).items()))
          for n in conc["serial"] for label, runs in (("one at a time", conc["serial"]), ("batched", conc["batched"]))),
        "",
        "Decode alone, batched against one stream at a time: benchmarks/results/batch_decode.md.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

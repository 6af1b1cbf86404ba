"""A second turn in a session that has ingested a repository of >= 200k tokens: time to first token after a resume
(open the session = restore its snapshot, then feed only the new turn) vs re-prefilling the whole history plus
the new turn on a fresh state, side by side in one run on the default model (4k window).

The repository is the standard library's Python sources copied into a temporary folder until it holds enough
tokens; ingest throughput is reported too.

    python benchmarks/agent_resume.py [--tokens 200000]
"""

from __future__ import annotations

import argparse
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from common import write_results

from deltamem.agent.runner import Agent
from deltamem.memory.store import Store
from deltamem.model import load_model


def build_repo(dest: Path, tokens: int, tok) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for f in sorted(stdlib.glob("*.py")):
        if f.stat().st_size > 200_000:
            continue
        shutil.copy(f, dest / f.name)
        total += len(tok.encode(f.read_text(errors="replace"))) + 8
        if total >= tokens:
            return total
    raise SystemExit(f"the standard library gave only {total} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--window", type=int, default=4096)
    args = ap.parse_args()
    question = "Which module defines the function that parses dates?"
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        engine = load_model("random", window=args.window, device="cpu", quant="none", compile_decode=False)
        build_repo(repo, args.tokens, engine.tokenizer)
        db = Path(tmp) / "memory.db"
        with Store(db) as store:
            agent = Agent(engine, store, "bench", repo, max_new_tokens=1)
            t0 = time.perf_counter()
            ing = agent.ingest()
            ingest_s = time.perf_counter() - t0
            history = agent.session.engine.tokens_seen
            print(
                f"ingested {ing.files} files, {ing.tokens:,} tokens in {ingest_s:.1f} s "
                f"({ing.tokens / ingest_s:,.0f} tok/s)",
                flush=True,
            )
            rendered = agent.session.template.render(
                [*agent.messages(), {"role": "user", "content": question}], add_generation_prompt=True
            )

        # resume in a fresh engine: open the session (restore) and answer the new turn
        with Store(db) as store:
            fresh = load_model("random", window=args.window, device="cpu", quant="none", compile_decode=False)
            first: list[float] = []
            t0 = time.perf_counter()
            resumed = Agent(fresh, store, "bench", repo, max_new_tokens=1)
            restore_s = time.perf_counter() - t0
            result = resumed.run(question, on_event=lambda e: first.append(time.perf_counter()) if "token" in e else 0)
            done = time.perf_counter()
            ttft_resume = (first[0] if first else done) - t0
            fed = result.tokens_fed

        # baseline: no snapshot, the whole history and the new turn are prefilled, then the first token
        base = load_model("random", window=args.window, device="cpu", quant="none", compile_decode=False)
        ids = base.tokenizer.encode(rendered)
        t0 = time.perf_counter()
        logits = base.feed(ids, logits="last")
        int(logits[-1].argmax())
        ttft_prefill = time.perf_counter() - t0

    row = {
        "history_tokens": history,
        "new_turn_tokens_fed": fed,
        "restore_ms": restore_s * 1e3,
        "ttft_resume_ms": ttft_resume * 1e3,
        "ttft_reprefill_ms": ttft_prefill * 1e3,
        "speedup": ttft_prefill / ttft_resume,
        "reprefill_tokens": len(ids),
        "ingest_tok_s": ing.tokens / ingest_s,
    }
    print(
        f"history {history:,} tokens: resume + first token {row['ttft_resume_ms']:.0f} ms (restore "
        f"{row['restore_ms']:.0f} ms, fed {fed} tokens) vs re-prefill {len(ids):,} tokens "
        f"{row['ttft_reprefill_ms']:.0f} ms = {row['speedup']:.0f}x",
        flush=True,
    )
    out = write_results(
        "agent_cpu",
        [row],
        "Agent: second turn after resume vs re-prefill (default model, 4k window)",
        list(row),
        window=args.window,
        command="python benchmarks/agent_resume.py",
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

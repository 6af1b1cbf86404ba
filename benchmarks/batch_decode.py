"""Batched decode (model/batch.py) against one stream at a time, side by side in one run, at OLMo Hybrid 7B shapes.

Random bf16 weights made on the GPU (benchmarks/gpu_e2e.py's builder), a 4096-token window + 4 sinks. B streams,
each at its own context (states as if it had consumed `--context` tokens plus a stream-specific offset, so every
stream sits at another ring position), decode `--steps` tokens:
- one at a time: each stream decoded alone on the engine's captured CUDA graph (Engine.decode), as `deltamem serve
  --no-batch-decode` does, one reply after the other;
- batched: DecodeBatch.step for all B streams at once (what `deltamem serve` does on a GPU).
Aggregate tok/s = B * steps / wall (CUDA-synchronised), B in --batches. --profile prints the top ops of one
batched step at the largest B.

    python benchmarks/batch_decode.py --out DIR [--batches 1,4,16] [--steps 64] [--context 8192] [--profile]

Writes DIR/batch_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import device_name, olmo_hybrid_7b_config, versions, write_out
from gpu_e2e import build_ours, ours_state_at, sync

from deltamem.model.batch import DecodeBatch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    eng = build_ours(olmo_hybrid_7b_config(), window=4096, sink=4, chunk=4096)
    vocab = eng.config.vocab_size

    def stream_state(i: int) -> list:
        ours_state_at(eng, args.context + 37 * i, seed=i)
        return eng.keep().states

    rows = []
    for b in sizes:
        # one at a time, on the decode graph (captured once, then reused for every stream: restore copies into it)
        states = [stream_state(i) for i in range(b)]
        logits = torch.zeros(1, vocab, device="cuda")
        ours_state_at(eng, args.context)
        eng.decode(logits, 8)  # capture and warm up
        sync()
        t0 = time.perf_counter()
        for i in range(b):
            ours_state_at(eng, args.context + 37 * i, seed=i)
            eng.decode(logits, args.steps)
        sync()
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(b):
            ours_state_at(eng, args.context + 37 * i, seed=i)
        sync()
        reset_s = time.perf_counter() - t0
        alone -= reset_s
        # batched
        batch = DecodeBatch(eng.model)
        for st in states:
            batch.add(st)
        ids = [1] * b
        for _ in range(4):  # warm-up
            ids = batch.step(ids).argmax(-1).tolist()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            ids = batch.step(ids).argmax(-1).tolist()
        sync()
        together = time.perf_counter() - t0
        row = {"batch": b, "steps": args.steps, "alone_s": alone, "alone_tok_s": b * args.steps / alone,
               "batched_s": together, "batched_tok_s": b * args.steps / together,
               "batched_step_ms": 1000 * together / args.steps}  # fmt: skip
        row["ratio"] = row["batched_tok_s"] / row["alone_tok_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.profile and b == max(sizes):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    ids = batch.step(ids).argmax(-1).tolist()
                sync()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
        del batch, states
        torch.cuda.empty_cache()

    doc = {"device": device_name(), "versions": versions(), "context": args.context, "window": 4096, "rows": rows}
    lines = [
        "# Batched decode against one stream at a time, OLMo Hybrid 7B shapes",
        "",
        f"{doc['device']}; random bf16 weights; window 4096 + 4 sinks; each stream at about {args.context:,} tokens "
        f"of context; {args.steps} tokens per stream; `python benchmarks/batch_decode.py`. One at a time: each "
        "stream alone on the captured CUDA graph (`deltamem serve --no-batch-decode`). Batched: one DecodeBatch "
        "step for all streams (`deltamem serve` on a GPU).",
        "",
        "| streams | one at a time tok/s | batched tok/s | batched step ms | batched / one at a time |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {r['batch']} | {r['alone_tok_s']:.1f} | {r['batched_tok_s']:.1f} | {r['batched_step_ms']:.1f} | "
          f"{r['ratio']:.2f}x |" for r in rows),
    ]  # fmt: skip
    write_out(args.out, "batch_decode", doc, lines)


if __name__ == "__main__":
    main()

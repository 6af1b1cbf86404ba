"""Is a restored state continued bit for bit on the GPU? OLMo Hybrid 7B shapes, random bf16 weights, window 4096.

For a state after N tokens (1,000: window partly filled; 6,000: wrapped), the snapshot is restored R times and the
same tokens are fed one at a time after each restore; a run counts as equal when its logits are bit-identical to
the first run's. Measured with the attention backends deltamem restricts SDPA to on a GPU (memory-efficient or
math: model/cache.py `_backends`), with PyTorch free to pick any, and with deltamem's own decode attention reading
the ring in place (DELTAMEM_DECODE_ATTENTION=ring), side by side, with the CUDA-graph decode rate (tokens/s at 8k
context) of each.

    python benchmarks/gpu_determinism.py --out DIR
Writes DIR/gpu_determinism.json and DIR/gpu_determinism.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from common import device_name, olmo_hybrid_7b_config, versions
from gpu_e2e import build_ours, ours_state_at

import deltamem.model.cache as cache

RESTRICTED = cache._backends


def any_backend(q):
    return contextlib.nullcontext()


def equal_runs(eng, seen: int, runs: int = 8) -> int:
    eng.reset()
    gen = torch.Generator().manual_seed(seen)
    vocab = eng.config.vocab_size
    eng.feed(torch.randint(0, vocab, (seen,), generator=gen).tolist(), logits="none")
    blob = eng.snapshot()
    nxt = torch.randint(0, vocab, (4,), generator=gen).tolist()
    outs = []
    for _ in range(runs):
        eng.restore(blob)
        outs.append(torch.cat([eng.feed([t]) for t in nxt]))
    return sum(torch.equal(o, outs[0]) for o in outs)


def decode_rate(eng, n: int = 256) -> float:
    ours_state_at(eng, 8192)
    logits = eng.feed([1], logits="last")
    eng.decode(logits, 32)  # capture and warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.decode(logits, n)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    base = build_ours(olmo_hybrid_7b_config(), 4096, 4, 4096)
    rows = []
    modes = (("restricted (deltamem)", RESTRICTED, "sdpa"), ("any (PyTorch's choice)", any_backend, "sdpa"),
             ("ring (kernels/attn_decode.py)", RESTRICTED, "ring"))
    chosen = os.environ.get("DELTAMEM_DECODE_ATTENTION")
    for name, backends, attention in modes:
        cache._backends = backends
        os.environ["DELTAMEM_DECODE_ATTENTION"] = attention  # read as each step is built (and captured)
        eng = base.sibling()
        row = {"decode_attention": name, "decode_tok_s_8k": round(max(decode_rate(eng), decode_rate(eng.sibling())), 1)}
        for seen in (1000, 6000):
            row[f"equal_runs_{seen}"] = f"{equal_runs(eng.sibling(), seen)}/8"
        rows.append(row)
        print(row, flush=True)
    cache._backends = RESTRICTED
    if chosen is None:
        os.environ.pop("DELTAMEM_DECODE_ATTENTION")
    else:
        os.environ["DELTAMEM_DECODE_ATTENTION"] = chosen
    doc = {"device": device_name(), "versions": versions(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_determinism.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Restore, then the same tokens one at a time: bit-identical runs (7B shapes, bf16, window 4096)", "",
             f"Device: {doc['device']}; torch {torch.__version__}", "",
             "| decode attention | equal runs, 1,000 seen | equal runs, 6,000 seen (wrapped) | decode tok/s at 8k |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['decode_attention']} | {r['equal_runs_1000']} | {r['equal_runs_6000']} | "
                     f"{r['decode_tok_s_8k']} |")
    (args.out / "gpu_determinism.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

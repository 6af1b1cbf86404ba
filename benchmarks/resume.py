"""Resume cost: restoring a snapshot vs re-prefilling the same tokens, side by side in one run.

For N in 1k, 4k, 16k, 64k tokens of real text (Python stdlib source), the default model with a 4k window:
prefill N tokens (the baseline a resume without snapshots pays), snapshot to a file, then time reading that
file and restoring it into a fresh engine. The restored state is checked to continue exactly like the original.

    python benchmarks/resume.py [--sizes 1024,4096,16384,65536] [--window 4096]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import corpus_text, timed, write_results

from deltamem.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,4096,16384,65536")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--model", default="random")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    engine = load_model(args.model, window=args.window, device="cpu", quant="none", compile_decode=False)
    fresh = load_model(args.model, window=args.window, device="cpu", quant="none", compile_decode=False)
    ids = engine.tokenizer.encode(corpus_text(6 * max(sizes)))
    if len(ids) < max(sizes):
        raise SystemExit(f"corpus gave only {len(ids)} tokens")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            engine.reset()
            prefill_s, _ = timed(lambda n=n: engine.feed(ids[:n], logits="last"))
            save_s, blob = timed(engine.snapshot, repeat=3)
            path = Path(tmp) / f"s{n}.snap"
            path.write_bytes(blob)

            def restore(path=path):
                fresh.restore(path.read_bytes())

            restore_s, _ = timed(restore, repeat=5)
            nxt = ids[n : n + 8]
            assert torch.equal(fresh.feed(nxt), engine.feed(nxt)), "restored state diverged"
            row = {
                "case": f"N={n}",
                "tokens": n,
                "ours_ms": restore_s * 1e3,
                "baseline": "re-prefill",
                "baseline_ms": prefill_s * 1e3,
                "speedup": prefill_s / restore_s,
                "snapshot_bytes": len(blob),
                "snapshot_save_ms": save_s * 1e3,
                "prefill_tok_s": n / prefill_s,
            }
            rows.append(row)
            print(
                f"N={n:>6}: restore {row['ours_ms']:8.1f} ms | re-prefill {row['baseline_ms']:9.1f} ms | "
                f"{row['speedup']:7.1f}x | snapshot {len(blob) / 1e6:.2f} MB, save {row['snapshot_save_ms']:.1f} ms",
                flush=True,
            )
    out = write_results(
        "resume_cpu",
        rows,
        "Resume: snapshot restore (file read + restore) vs re-prefill",
        ["case", "ours_ms", "baseline_ms", "speedup", "snapshot_bytes", "snapshot_save_ms", "prefill_tok_s"],
        model=args.model,
        window=args.window,
        command="python benchmarks/resume.py",
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""GPU: the engine at Qwen3.5-9B's shapes next to OLMo Hybrid 7B's, side by side in one run. Random bf16 weights
made on the GPU (no download), window 4096 + 4 sinks, decode through the captured CUDA graph.

- prefill tok/s of one 8k and one 32k prompt (the faster of two runs: the first may autotune kernels);
- decode tok/s at contexts 1k and 32k (state built directly, as benchmarks/gpu_e2e.py does), 256 steps;
- weights and state bytes.

    python benchmarks/gpu_qwen.py --out DIR

Writes DIR/gpu_qwen.json and DIR/gpu_qwen.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import device_name, olmo_hybrid_7b_config, versions
from gpu_e2e import GIB, best_of_two, build_ours, decode_ours, oom_guard, prefill_ours, weight_bytes
from model_sizes import MODELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=256)
    args = ap.parse_args()
    started = time.time()
    shapes = {"OLMo-Hybrid-7B": olmo_hybrid_7b_config(), "Qwen3.5-9B": MODELS["Qwen3.5-9B"]}
    rows = []
    for name, hf in shapes.items():
        eng = build_ours(hf, window=4096, sink=4, chunk=4096)
        row = {"model": name, "weight_gib": weight_bytes(eng.model) / GIB, "state_mb": eng.state_bytes() / 1e6}
        for n in (8192, 32768):
            row[f"prefill_{n}"] = best_of_two(prefill_ours, eng, n)
        for n in (1024, 32768):
            row[f"decode_{n}"] = oom_guard(decode_ours, eng, n, args.steps)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del eng
        torch.cuda.empty_cache()
    doc = {"device": device_name(), "versions": versions(), "rows": rows, "seconds": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_qwen.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Qwen3.5-9B shapes next to OLMo Hybrid 7B on the GPU",
        "",
        f"{doc['device']}; {', '.join(f'{k} {v}' for k, v in doc['versions'].items())}. Random bf16 weights, window "
        f"4096 + 4 sinks, `python benchmarks/gpu_qwen.py`. Decode through the CUDA graph, {args.steps} steps.",
        "",
        "| model | weights GiB | state MB | prefill 8k tok/s | prefill 32k tok/s | decode @1k tok/s "
        "| decode @32k tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r[k].get("tok_s") for k in ("prefill_8192", "prefill_32768", "decode_1024", "decode_32768")]
        lines.append(f"| {r['model']} | {r['weight_gib']:.1f} | {r['state_mb']:.0f} | "
                     + " | ".join("-" if c is None else f"{c:,.0f}" for c in cells) + " |")
    (args.out / "gpu_qwen.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

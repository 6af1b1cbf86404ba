"""Where a decode step's time goes, at OLMo Hybrid 7B shapes on the GPU (random bf16 weights, as gpu_e2e.py).

Profiles replays of the captured decode graph (CUPTI records the kernels inside a graph) and reports, per step:
the wall time, the number of kernels, the sum of their durations (the rest is gaps between kernels), and the
kernels grouped by name with their share, plus the weight-reading floor (weight bytes / the HBM bandwidth).

    python benchmarks/profile_decode.py --out DIR [--context 8192] [--steps 32]

Writes DIR/profile_decode.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from common import device_name, olmo_hybrid_7b_config
from gpu_e2e import GIB, build_ours, ours_state_at, timed_cuda, weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--hbm-tb-s", type=float, default=3.35, help="HBM bandwidth for the floor (H100 SXM: 3.35)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    eng = build_ours(olmo_hybrid_7b_config(), 4096, 4, 4096)
    ours_state_at(eng, args.context)
    logits = eng.feed([11], logits="last")
    eng.decode(logits, 16)  # captures the graph
    graph = eng._graph
    s, _ = timed_cuda(lambda: [graph.step() for _ in range(args.steps)])
    wall_ms = s * 1e3 / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            graph.step()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name].append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    rows = sorted(
        (
            {"kernel": n[:110], "per_step": len(v) / args.steps, "us_per_step": sum(v) / args.steps}
            for n, v in by_name.items()
        ),
        key=lambda r: -r["us_per_step"],
    )
    busy = sum(r["us_per_step"] for r in rows)
    wbytes = weight_bytes(eng.model)
    doc = {
        "device": device_name(),
        "torch": torch.__version__,
        "context": args.context,
        "wall_ms_per_step": wall_ms,
        "kernels_per_step": sum(r["per_step"] for r in rows),
        "kernel_busy_ms_per_step": busy / 1e3,
        "weights_gib": wbytes / GIB,
        "weight_floor_ms": wbytes / (args.hbm_tb_s * 1e12) * 1e3,
        "kernels": rows,
    }
    (args.out / "profile_decode.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "kernels"}, indent=1))
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f} us {r['per_step']:6.1f}x  {r['kernel']}")


if __name__ == "__main__":
    main()

"""Where the chunked gated-delta-rule prefill's time goes, kernel by kernel: ours vs fla, at 7B shapes.

Runs each op a few times under the profiler at each T and reports every kernel's time per call, so a long-T gap
between the two shows which stage (solve, w/u, state pass, output) it is in.

    python benchmarks/profile_chunk.py --out DIR [--t 8192,32768,65536] [--baseline OLD_chunk.py ...]

--baseline profiles another copy of kernels/chunk.py beside the current one (e.g. the last commit's, from
`git show HEAD:kernels/chunk.py > OLD.py`: it imports its helpers from the installed deltamem.kernels), named by its
file's stem; repeat it for several: kernel changes measured side by side in one run.

Writes DIR/profile_chunk.json and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import torch
from common import ROOT, device_name

from deltamem.kernels import chunk

_spec = importlib.util.spec_from_file_location("kernels_bench", ROOT / "benchmarks" / "gdn_kernels.py")
kernels_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels_bench)


def profile(fn, reps: int) -> list[dict]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name].append(e.device_time_total)
    return sorted(
        ({"kernel": n[:90], "per_call": len(v) / reps, "us_per_call": sum(v) / reps} for n, v in by_name.items()),
        key=lambda r: -r["us_per_call"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--t", default="8192,32768,65536")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--baseline", type=Path, action="append", default=[], help="another copy of kernels/chunk.py")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ops = {"ours": chunk.chunk_gated_delta_rule}
    modules = {"ours": chunk}
    for path in args.baseline:
        spec = importlib.util.spec_from_file_location(f"chunk_{path.stem}", path)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        ops[path.stem] = other.chunk_gated_delta_rule
        modules[path.stem] = other
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        ops["fla"] = lambda **x: fla_chunk(**x, output_final_state=True, use_qk_l2norm_in_kernel=True)
    except ImportError:
        pass
    doc = {"device": device_name(), "torch": torch.__version__, "cases": []}
    for t in (int(s) for s in args.t.split(",")):
        x = kernels_bench.make_inputs(t, seed=t)
        for name, op in ops.items():
            rows = profile(lambda op=op, x=x: op(**x), args.reps)
            total = sum(r["us_per_call"] for r in rows)
            doc["cases"].append({"T": t, "op": name, "total_us": total, "kernels": rows})
            print(f"T={t} {name}: {total:.0f} us")
            for r in rows:
                print(f"   {r['us_per_call']:9.1f} us {r['per_call']:4.1f}x  {r['kernel']}")
    doc["autotuned"] = {
        op: {
            name: str(getattr(getattr(module, name), "best_config", None))
            for name in ("_solve_kernel", "_wu_kernel", "_state_kernel", "_output_kernel")
        }
        for op, module in modules.items()
    }
    print(doc["autotuned"])
    (args.out / "profile_chunk.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()

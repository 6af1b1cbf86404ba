"""Loading a 7B-shaped checkpoint onto a GPU: host memory and time, ours (streamed tensor by tensor from the
safetensors shards onto the device) beside the whole-file way (each shard read into host memory with
safetensors.torch.load_file, then moved), in one run on one machine.

Writes an OLMo Hybrid 7B-shaped checkpoint with random bf16 weights as 5 GB shards (no download; model names as
our loader reads them), then loads it in a fresh interpreter per method. Host memory: the process's peak resident
size (VmHWM, reset just before the load) above its resident size once torch, deltamem and the CUDA context are up
(the "baseline"). Also times a `deltamem info` subprocess on the checkpoint (the CLI end to end).

    python benchmarks/gpu_load.py --out DIR [--keep PATH]
Writes DIR/gpu_load.json and DIR/gpu_load.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, device_name, olmo_hybrid_7b_config, versions
from safetensors.torch import save_file

from deltamem.model.config import ModelConfig
from deltamem.model.layers import HybridLM

SHARD_BYTES = 5 << 30

MEASURE = """
import json, sys, time, torch
from deltamem.model import load_model
from safetensors.torch import load_file
torch.cuda.init(); torch.empty(1, device="cuda")  # the CUDA context belongs to the baseline

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

method, path = sys.argv[1], sys.argv[2]
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
t0 = time.perf_counter()
if method == "ours":
    engine = load_model(path, device="cuda", dtype="bfloat16", window=4096)
    fp = engine.fingerprint
else:  # the whole-file way: every shard into host memory, then onto the GPU
    import glob
    sd = {}
    for f in sorted(glob.glob(path + "/model-*.safetensors")):
        sd.update(load_file(f))
    sd = {k: v.to("cuda") for k, v in sd.items()}
    fp = None
torch.cuda.synchronize()
print(json.dumps({"method": method, "seconds": time.perf_counter() - t0, "baseline_rss": base,
                  "peak_rss_above_baseline": status("VmHWM") - base, "gpu_allocated": torch.cuda.memory_allocated(),
                  "fingerprint": fp}))
"""


@torch.no_grad()
def write_checkpoint(root: Path, hf: dict | None = None) -> int:
    """A sharded HF folder of random bf16 weights (normal, std 0.02) for the config `hf` (default: OLMo Hybrid 7B's
    shapes); returns its bytes."""
    if hf is None:
        hf = olmo_hybrid_7b_config() | {"eos_token_id": 100257, "pad_token_id": 100277, "tie_word_embeddings": False}
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(hf))
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in HybridLM(ModelConfig.from_hf(hf)).state_dict().items()}
    gen = torch.Generator(device="cuda").manual_seed(0)
    shard, size, n, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for k, (shape, _) in sorted(shapes.items()):
        t = (torch.randn(shape, device="cuda", dtype=torch.float32, generator=gen) * 0.02).to(torch.bfloat16)
        shard[k] = t.cpu()
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total


def measure(method: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, method, str(path)], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode != 0:
        return {"method": method, "error": r.stderr[-2000:]}
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "olmo-hybrid-7b-shaped"
        t0 = time.perf_counter()
        total = write_checkpoint(path)
        print(f"wrote {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = [measure("ours", path), measure("load_file then .to(cuda)", path)]
        t0 = time.perf_counter()
        info = subprocess.run([sys.executable, "-P", str(ROOT / "app.py"), "info", "--model", str(path)],
                              capture_output=True, text=True, cwd=ROOT)
        cli = {"seconds": time.perf_counter() - t0, "rc": info.returncode,
               "info": json.loads(info.stdout) if info.returncode == 0 else info.stderr[-2000:]}
    for r in rows:
        print(r, flush=True)
    doc = {"device": device_name(), "versions": versions(), "checkpoint_bytes": total, "rows": rows, "cli_info": cli}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    gib = 1 << 30
    lines = [f"# Loading a 7B-shaped checkpoint ({total / gib:.1f} GiB bf16, 5 GB shards) onto the GPU", "",
             f"Device: {doc['device']}; torch {torch.__version__}", "",
             "| method | seconds | peak host RSS above baseline (GiB) | baseline RSS (GiB) | GPU allocated (GiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed | | | |")
            continue
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {r['peak_rss_above_baseline'] / gib:.2f} | "
                     f"{r['baseline_rss'] / gib:.2f} | {r['gpu_allocated'] / gib:.1f} |")
    lines += ["", f"`deltamem info` on it, end to end: {cli['seconds']:.1f} s (exit {cli['rc']})."]
    (args.out / "gpu_load.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

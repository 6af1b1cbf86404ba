"""Start-up of the CLI with the default model, cold (the first load converts the GGUF + delta and fills the start-up
cache) and warm (later loads read the cache): `deltamem info --model default` to exit, and `deltamem generate` to its
first streamed byte of output, each as a fresh process, as a user launches them. Same machine, one run.

    python benchmarks/startup.py [--repeat 3]

Writes benchmarks/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, versions


def cpu() -> dict:
    info = {"cores": os.cpu_count()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["model"] = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
        flags = next(x.split(":", 1)[1].split() for x in lines if x.startswith("flags"))
        info["vector"] = sorted(set(flags) & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "avx512_vnni"})
    except (OSError, StopIteration):
        pass
    return info


def launch(args: list[str], env: dict, first_byte: bool) -> float:
    """Seconds from spawning `deltamem ARGS` to its exit (or to its first byte on stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-P", str(ROOT / "app.py"), *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    if first_byte:
        assert p.stdout.read(1), "no output"
        t = time.perf_counter() - t0
        p.stdout.read()
        p.wait()
    else:
        p.stdout.read()
        p.wait()
        t = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"deltamem {' '.join(args)} exited {p.returncode}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="deltamem-startup-")
    env = {**os.environ, "DELTAMEM_CACHE": cache, "PYTHONPATH": str(ROOT)}
    env.pop("DELTAMEM_COMPILE", None)  # the CLI's default: the decode step compiled where a C++ compiler is found
    info = ["info", "--model", "default"]
    gen = ["generate", "--model", "default", "--max-new-tokens", "8", "Hello"]
    try:
        rows = {"info cold (converts, fills the cache)": launch(info, env, False)}
        rows["info warm"] = statistics.median(launch(info, env, False) for _ in range(args.repeat))
        rows["generate, first byte, compiling the decode step (once)"] = launch(gen, env, True)
        rows["generate warm, first byte"] = statistics.median(launch(gen, env, True) for _ in range(args.repeat))
        eager = [*gen[:1], "--no-compile", *gen[1:]]
        rows["generate warm --no-compile, first byte"] = statistics.median(
            launch(eager, env, True) for _ in range(args.repeat)
        )
        off = {**env, "DELTAMEM_CACHE": "off"}
        rows["generate without the cache, first byte"] = launch(gen, off, True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # a float32 copy of the model
    doc = {"cpu": cpu(), "versions": versions(), "seconds": rows, "target_s": 2.0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Start-up with the default model",
        "",
        f"CPU: {doc['cpu'].get('model', '?')}, {doc['cpu']['cores']} cores, {', '.join(doc['cpu'].get('vector', []))}; "
        f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items())}. `python benchmarks/startup.py` (median of "
        f"{args.repeat} launches where warm). Target: info and the first token within 2 s on a warm cache.",
        "",
        "| launch | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in rows.items()),
    ]
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

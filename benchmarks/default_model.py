"""The default model (model/distilled.py) against its teacher, SmolLM2-135M-Instruct, on this CPU: five chat
transcripts side by side (greedy, the engine's chat template) and decode tokens/s of both through our engine.
Held-out perplexity, agreement and recall come from the GPU run of scripts/distill.py (its eval.json, passed with
--eval); this script folds them into benchmarks/results/default_model.md.

    python benchmarks/default_model.py --eval benchmarks/results/default_model_eval.json \
        --previous benchmarks/results/default_model_eval_previous.json --heldout W/heldout.u16
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, timed, versions

from deltamem.model import load_model
from deltamem.model.gguf_file import smollm2_gguf

TARGET = 1.10  # the bound on student / teacher held-out perplexity
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the squares of a list of numbers.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for writing clear commit messages.",
    "What does the `git rebase` command do?",
]


def chat(engine, prompt: str, n: int) -> tuple[str, float, int]:
    from deltamem.agent.prompt import ChatTemplate

    engine.reset()
    ids = engine.tokenizer.encode(
        ChatTemplate.for_tokenizer(engine.tokenizer).render([{"role": "user", "content": prompt}])
    )
    secs, text = timed(lambda: "".join(engine.generate(ids, max_new_tokens=n)))
    return text, secs, len(engine.generated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=Path, help="eval.json written by scripts/distill.py on the GPU")
    ap.add_argument("--previous", type=Path, help="eval.json of an earlier delta on the same held-out sample")
    ap.add_argument(
        "--heldout",
        type=Path,
        help="heldout.u16 of scripts/distill.py's --work: also measure perplexity through the engines on this CPU, "
        "on the sequences halfway between the GPU evaluation's (a second sample of the same split)",
    )
    ap.add_argument("--heldout-seqs", type=int, default=31)
    ap.add_argument("--new-tokens", type=int, default=96)
    args = ap.parse_args()
    student = load_model("default", device="cpu", quant="none", compile_decode=False)
    teacher = load_model(smollm2_gguf(), window=student.window, device="cpu", quant="none", compile_decode=False)
    lines = ["# Default model: distilled SmolLM2-135M hybrid vs its teacher", ""]
    ev = json.loads(args.eval.read_text()) if args.eval else None
    prev = json.loads(args.previous.read_text()) if args.previous else None
    if ev:
        meta = ev.get("delta_meta", {})
        lines += [
            "Made by `scripts/distill.py` over seven sessions. Sessions 1-6, one H100 (about 58 minutes of "
            "training): stage 1, 220 steps of per-layer alignment (16 x 1024 tokens a step); stage 2, end-to-end KL "
            f"with the student's bounded window ({meta.get('sink', 4)} sink + {meta.get('window', 1024)}) on "
            "4096-token sequences, 8 x 4096 tokens a step, 3,956 steps in six rounds (`--init-delta` resumes "
            f"the shipped delta); the last 1,953 of them also trained rank-{meta.get('lora_rank', 64)} low-rank "
            "updates of every MLP projection and the kept attention layers (at a tenth of the learning rate). "
            f"Session 7: from that delta, {int(meta.get('step', 0)):,} steps data-parallel on 4 H200s "
            "(4 x 8 x 4096 tokens a step, 0.35 s a step through fla's kernels, "
            f"{int(meta.get('stage2_seconds', 0)):,} s; learning rate warmed to 2e-4, cosine to 2e-5). "
            "In every round 25% of sequences are recall drills (3 facts spliced into code more than a window "
            "before questions on them; answer cross-entropy x 0.5 next to the KL; wording unlike the recall test "
            "below): their answer loss stayed near 2 nats through every one-GPU round and fell to near 0 between "
            "steps 1,225 and 1,500 of session 7. Corpus: permissively licensed packages' sources and docs + the "
            "standard library, split by package; 15% of sequences are the teacher's own answers to 363 chat "
            "prompts.",
            "",
        ]
        if prev:
            lines += [
                "Side by side on the same held-out sample, the previous delta (sessions 1-6, "
                f"{int(prev['delta_meta'].get('step', 0)):,} steps in its last round) measured student "
                f"{prev['models']['student_window' + str(ev['window'])]['ppl']:.3f} "
                f"(**{prev['ppl_ratio_student_vs_teacher_full']:.3f}x**); its rows are marked *previous* below. "
                "(On the earlier sessions' sample, built from other package versions, it measured 6.897 against "
                "the teacher's 5.686: 1.213x.)",
                "",
            ]
        lines += _eval_table(ev, prev)
    if args.heldout:
        lines += second_sample(student, args.heldout, args.heldout_seqs, ev)
    speed = {"student": [0.0, 0], "teacher": [0.0, 0]}
    lines += ["## Five chat transcripts (greedy, CPU, fp32, same window)", ""]
    for p in PROMPTS:
        lines.append(f"**User:** {p}")
        lines.append("")
        for name, eng in (("student", student), ("teacher", teacher)):
            text, secs, n = chat(eng, p, args.new_tokens)
            speed[name][0] += secs
            speed[name][1] += n
            lines.append(f"*{name}:* " + " ".join(text.split()))
            lines.append("")
    st, te = (speed[k][1] / speed[k][0] for k in ("student", "teacher"))
    lines += [
        "## CPU decode (2 cores, fp32, whole generate calls above)",
        "",
        "| model | tokens/s |",
        "|---|---|",
        f"| student (hybrid) | {st:.1f} |",
        f"| teacher | {te:.1f} |",
        "",
        f"versions: {json.dumps(versions())}",
        "",
        "command: `python benchmarks/default_model.py --eval benchmarks/results/default_model_eval.json "
        "--previous benchmarks/results/default_model_eval_previous.json --heldout W/heldout.u16` "
        "(W: `scripts/distill.py data --work W`)",
        "",
    ]
    out = RESULTS / "default_model.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def second_sample(student, path: Path, n: int, ev: dict | None) -> list[str]:
    """Held-out perplexity through the product's own path (Engine.feed: chunked prefill, the student's bounded
    cache, the int8 delta as load_model combines it), float32 on this CPU, on `n` sequences halfway between the
    starts of the GPU evaluation's sample, so none of its sequences."""
    t = ev["seq_len"] if ev else 4096
    k = ev["heldout_tokens"] // (t - 1) if ev else 32  # the GPU sample's sequence count
    held = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    starts = np.linspace(0, len(held) - t, k).astype(int)
    starts = ((starts[:-1] + starts[1:]) // 2)[:n]
    # full attention
    teacher = load_model(smollm2_gguf(), window=None, device="cpu", quant="none", compile_decode=False)
    nll = {"teacher_full": 0.0, f"student_window{student.window}": 0.0}
    for j, s in enumerate(starts):
        ids = torch.from_numpy(held[s : s + t])
        for name, eng in zip(nll, (teacher, student), strict=True):
            eng.reset()
            lp = eng.feed(ids).log_softmax(-1)[:-1]
            nll[name] += float(-lp.gather(-1, ids[1:, None]).sum())
        print(f"second sample: {j + 1}/{len(starts)} sequences", flush=True)
    ppl = {name: math.exp(v / (len(starts) * (t - 1))) for name, v in nll.items()}
    te, st = ppl.values()
    return [
        f"Second sample (CPU, float32, through `load_model` and `Engine.feed`): {len(starts)} sequences of {t} "
        f"tokens halfway between those above: teacher_full {te:.3f}, student_window{student.window} {st:.3f}, "
        f"student / teacher {_verdict(st / te)}.",
        "",
    ]


def _verdict(ratio: float) -> str:
    return f"**{ratio:.4f}x** (target {TARGET:.2f}x: {'met' if ratio <= TARGET else 'not met'})"


def _with_previous(rows: dict, previous: dict | None, students: list[str]) -> list[tuple[str, dict]]:
    """(label, figures) for each model of this evaluation, then the earlier delta's students marked *previous*."""
    earlier = [(f"{n} *previous*", previous[n]) for n in students if previous and n in previous]
    return list(rows.items()) + earlier


def _eval_table(ev: dict, prev: dict | None = None) -> list[str]:
    """The perplexity and recall tables; with `prev` (an earlier delta's eval.json), its student rows too."""
    w = ev["window"]
    if prev and (prev["heldout_tokens"], prev["models"]["teacher_full"]) != (
        ev["heldout_tokens"],
        ev["models"]["teacher_full"],
    ):
        raise SystemExit("--previous was evaluated on another held-out sample: its teacher's figures differ")
    students = [n for n in ev["models"] if n.startswith("student")]
    rows = [
        "## Held-out perplexity (GPU, bf16; packages never trained on)",
        "",
        f"{ev['heldout_tokens']:,} tokens in sequences of {ev['seq_len']}; window = {ev['sink']} sink + {w}.",
        "",
        "| model | perplexity | ppl past the window | top-1 agreement with teacher |",
        "|---|---|---|---|",
    ]
    for name, m in _with_previous(ev["models"], prev and prev["models"], students):
        rows.append(
            f"| {name} | {m['ppl']:.3f} | {m['ppl_past_window']:.3f} | {m['top1_agreement_with_teacher_full']:.3f} |"
        )
    rows += [
        "",
        f"student / teacher perplexity: {_verdict(ev['ppl_ratio_student_vs_teacher_full'])}",
        "",
        "## Long-context recall (a 5-digit code, 10 candidates; greedy = every answer token is argmax)",
        "",
        "| distance | model | ranked first of 10 | greedy exact |",
        "|---|---|---|---|",
    ]
    for dist, by_model in ev["recall"].items():
        for name, r in _with_previous(by_model, prev and prev["recall"].get(dist), students):
            rows.append(f"| {dist} | {name} | {r['ranked_first_of_10']:.2f} | {r['greedy_exact']:.2f} |")
    return rows + [""]


if __name__ == "__main__":
    main()

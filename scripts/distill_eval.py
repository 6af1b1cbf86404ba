"""scripts/distill.py's evaluation: held-out perplexity and next-token agreement of the teacher (full and windowed)
and the student (windowed and not), and long-context recall of a fact placed 2x/4x/8x the window back, from the
shipped int8 delta. Writes --out's eval.json."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from distill_models import EOT, SINK, build_models, tokenizer
from distill_ranks import log
from distill_train import chunk_op

from deltamem.model import distilled
from deltamem.model.train import hidden_states, logits


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

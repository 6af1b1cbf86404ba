"""One decode token's attention over a bounded KV ring on the GPU: today's step (kv_step's mask, then SDPA held to the
memory-efficient kernel, model/cache.py KVWindow._attend_step) against kv_step then kernels/attn_decode.py's
decode_attention (the ring read in place, a fixed reduction order), side by side in one run, at OLMo Hybrid 7B's
attention shapes (30 heads of 128, no grouping) and Qwen3.5-9B's (16 heads of 256 over 4 kv heads, gated, rotary
sink queries), for a full window of 4096 + 4 sinks.

Per shape: microseconds per call (CUDA events over many calls), the bytes one call must read (keys and values of
the ring) over that time, whether 8 calls on the same input gave bit-identical outputs, and the error of each
against a float64 reference.

    python benchmarks/attn_decode.py --out DIR

Writes DIR/attn_decode_gpu.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import device_name, write_out

from deltamem import kernels
from deltamem.kernels import reference
from deltamem.model.cache import _aligned, _backends, _sdpa

SHAPES = {  # heads, kv heads, head width, gated (and rotary: sink queries)
    "OLMo Hybrid 7B": (30, 30, 128, False),
    "Qwen3.5-9B": (16, 4, 256, True),
}


def timed(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def replayed(fn, calls: int = 20, replays: int = 20) -> float:
    """Microseconds a call on the GPU alone: `calls` calls captured in one CUDA graph, replayed (no launch cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench(name: str, heads: int, hkv: int, d: int, gated: bool, sink: int, window: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    n = _aligned(sink + window)
    kc = torch.randn(hkv, n, d, device=dev, dtype=dt, generator=gen)
    vc = torch.randn(hkv, n, d, device=dev, dtype=dt, generator=gen)
    p = sink + 3 * window + 17  # wrapped a few times: every ring slot holds a key the token sees
    slot = torch.arange(sink + window)
    held = torch.where(slot < sink, slot, p - (p - slot) % window)  # the latest position each ring slot took
    pos = torch.cat([held, torch.full((n - sink - window,), -1)]).to(dev)
    pt = torch.tensor([p], device=dev)
    q, q_sink, gate = (torch.randn(heads, d, device=dev, dtype=dt, generator=gen) for _ in range(3))
    k_new, v_new = (torch.randn(hkv, d, device=dev, dtype=dt, generator=gen) for _ in range(2))
    extra = {"q_sink": q_sink, "gate": gate} if gated else {}
    scale = d**-0.5

    def today():  # KVWindow._attend_step without rotary (the sink queries' separate path is Python-side there)
        mask = kernels.kv_step(kc, vc, pos, k_new, v_new, pt, sink, window)
        with _backends(q):
            out = _sdpa(q[None], kc, vc, mask[None], scale)[0]
        return out * torch.sigmoid(gate) if gated else out

    def ours():
        kernels.kv_step(kc, vc, pos, k_new, v_new, pt, sink, window)
        return kernels.decode_attention(q, kc, vc, pos, pt, sink, window, scale, **extra)

    want_today = reference.decode_attention(q.double(), kc.double(), vc.double(), pos, pt, sink, window, scale,
                                            gate=gate.double() if gated else None)  # fmt: skip
    want_ours = reference.decode_attention(q.double(), kc.double(), vc.double(), pos, pt, sink, window, scale,
                                           **{k: v.double() for k, v in extra.items()})  # fmt: skip
    row = {"shape": name, "heads": heads, "kv_heads": hkv, "head_dim": d, "gated": gated, "slots": n}
    for label, fn, want in (("today", today, want_today), ("ours", ours, want_ours)):
        outs = [fn() for _ in range(8)]
        row[f"{label}_us"] = timed(fn)
        row[f"{label}_graph_us"] = replayed(fn)
        row[f"{label}_identical"] = all(torch.equal(o, outs[0]) for o in outs)
        row[f"{label}_err"] = rel(outs[0], want)
    row["bytes"] = 2 * hkv * n * d * 2
    row["ours_gb_s"] = row["bytes"] / row["ours_graph_us"] / 1e3
    row["speedup"] = row["today_us"] / row["ours_us"]
    row["graph_speedup"] = row["today_graph_us"] / row["ours_graph_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--sink", type=int, default=4)
    args = ap.parse_args()
    rows = [bench(name, *shape, args.sink, args.window) for name, shape in SHAPES.items()]
    doc = {"device": device_name(), "window": args.window, "sink": args.sink, "rows": rows}
    lines = [
        "# Decode attention over the bounded ring: today's step against decode_attention",
        "",
        f"{doc['device']}; window {args.window} + {args.sink} sinks, bf16; `python benchmarks/attn_decode.py` (one "
        "call = kv_step's write and the attention of one token over every kv head, CUDA events; eager: launched "
        "from Python one by one, launch cost included; graph: replayed from a CUDA graph, the GPU's time alone).",
        "",
        "| shape | today us eager / graph | decode_attention us eager / graph | x eager / graph | its GB/s (K+V "
        "read, graph) | bit-identical x8 (today / ours) | error vs fp64 (today / ours) |",
        "|---|---:|---:|---:|---:|---|---|",
        *(f"| {r['shape']} | {r['today_us']:.1f} / {r['today_graph_us']:.1f} | {r['ours_us']:.1f} / "
          f"{r['ours_graph_us']:.1f} | {r['speedup']:.2f}x / {r['graph_speedup']:.2f}x | {r['ours_gb_s']:.0f} | "
          f"{r['today_identical']} / {r['ours_identical']} | {r['today_err']:.1e} / {r['ours_err']:.1e} |"
          for r in rows),  # fmt: skip
    ]
    write_out(args.out, "attn_decode_gpu", doc, lines)


if __name__ == "__main__":
    main()

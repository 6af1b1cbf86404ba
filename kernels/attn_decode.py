"""Triton decode attention over a bounded KV ring, read in place (sinks + window: no mask tensor, no copy), split
over the slots with a fixed reduction order; the torch reference is kernels/attn_decode_ref.py, the window rule
kernels/window.py.

Two kernels. The first runs one program per (kv head, split): the split's slots, a fixed range of BN-slot blocks,
are read in order with an online softmax for the kv head's G query heads together (grouped-query: each key and
value row is read once for the group), leaving the split's max, sum and weighted values. The second combines the
splits of each head in split order and applies the output gate. Where a result goes and in which order it is
summed depend only on the shapes, never on scheduling, so a step is bit-identical across runs, restores and
CUDA-graph replays, unlike a split-K whose partial sums meet in whatever order the hardware finishes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltamem.kernels.triton_util import block, mm

BN = 64  # slots a block
PROGRAMS = 512  # splits of the slots are added until (streams x kv heads x splits) reaches this (or one block each):
# the parallelism a few kv heads lack at one query token; it depends on the shapes alone, never on the device


@triton.jit
def _split_kernel(
    q, q_sink, k_cache, v_cache, pos, p_ptr, part_o, part_ml, N, sink, window, scale, HKV, G, D, BLOCKS,
    HAS_SINKQ: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)  # a stream's kv head, a split of its slots
    n_split = tl.num_programs(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    p = tl.load(p_ptr + i_b)
    pos += i_b * N
    o_g, o_d = tl.arange(0, BG), tl.arange(0, BD)
    m_gd = (o_g < G)[:, None] & (o_d < D)[None, :]
    rows = ((i_b * HKV + i_h) * G + o_g)[:, None] * D + o_d[None, :]
    qq = tl.load(q + rows, mask=m_gd, other=0.0)  # [BG, BD]
    if HAS_SINKQ:
        qs = tl.load(q_sink + rows, mask=m_gd, other=0.0)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    base = i_bh.to(tl.int64) * N * D
    for j in range(i_s * BLOCKS, (i_s + 1) * BLOCKS):
        o_n = j * BN + tl.arange(0, BN)
        m_n = o_n < N
        kp = tl.load(pos + o_n, mask=m_n, other=-1)
        # kernels/window.py visible(kp, p, sink, window)
        seen = (kp >= 0) & (kp <= p) & ((kp < sink) | (kp > p - window))
        kv_rows = base + o_n[:, None] * D + o_d[None, :]
        m_nd = m_n[:, None] & (o_d < D)[None, :]
        k = tl.load(k_cache + kv_rows, mask=m_nd, other=0.0)  # [BN, BD]
        s = mm(qq, tl.trans(k), "ieee")  # [BG, BN], fp32
        if HAS_SINKQ:
            if j * BN < sink:  # the sink slots are scored by the queries rotated at the clamped position
                s = tl.where((o_n < sink)[None, :], mm(qs, tl.trans(k), "ieee"), s)
        s = tl.where(seen[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no NaN from -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        e = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(e, 1)
        v = tl.load(v_cache + kv_rows, mask=m_nd & seen[:, None], other=0.0)  # an unseen slot: never read
        acc = acc * alpha[:, None] + mm(e.to(v.dtype), v, "ieee")
        m_i = m_new
    at = (i_bh * n_split + i_s) * BG
    tl.store(part_o + (at + o_g)[:, None] * BD + o_d[None, :], acc)
    tl.store(part_ml + (at + o_g) * 2, m_i)
    tl.store(part_ml + (at + o_g) * 2 + 1, l_i)


@triton.jit
def _combine_kernel(
    part_o, part_ml, gate, out, G, D, N_SPLIT,
    HAS_GATE: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr,
):
    i_q = tl.program_id(0)  # a stream's query head (stream-major, as q's rows)
    i_h, i_g = i_q // G, i_q % G  # i_h: the stream's kv head, counted over every stream
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_all = tl.full([], float("-inf"), tl.float32)
    for i_s in range(0, N_SPLIT):  # the splits' max, in split order
        m_all = tl.maximum(m_all, tl.load(part_ml + ((i_h * N_SPLIT + i_s) * BG + i_g) * 2))
    l_all = tl.zeros([], tl.float32)
    acc = tl.zeros([BD], tl.float32)
    for i_s in range(0, N_SPLIT):  # then their sums, in split order
        at = (i_h * N_SPLIT + i_s) * BG + i_g
        w = tl.exp(tl.load(part_ml + at * 2) - m_all)  # an empty split: exp(-inf) = 0
        l_all += w * tl.load(part_ml + at * 2 + 1)
        acc += w * tl.load(part_o + at * BD + o_d)
    o = acc / l_all
    if HAS_GATE:
        gt = tl.load(gate + i_q * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        o = o * tl.sigmoid(gt)
    tl.store(out + i_q * D + o_d, o.to(out.dtype.element_ty), mask=m_d)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, p: torch.Tensor, sink: int,
    window: int, scale: float, q_sink: torch.Tensor | None = None, gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token's attention over a bounded KV ring (or one for each of B streams), in two kernels: the
    contract of kernels/attn_decode_ref.py's decode_attention."""
    batched = q.dim() == 3
    b, (h, d) = (q.shape[0] if batched else 1), q.shape[-2:]
    hkv, n = k_cache.shape[-3], k_cache.shape[-2]
    if (h % hkv or v_cache.shape != k_cache.shape or k_cache.shape[-1] != d or k_cache.dim() != q.dim() + 1
            or pos.shape != k_cache.shape[:-3] + (n,) or p.shape != (b,) or (batched and k_cache.shape[0] != b)):
        raise ValueError(f"decode_attention: q{tuple(q.shape)} cache{tuple(k_cache.shape)} pos{tuple(pos.shape)} "
                         f"p{tuple(p.shape)}")  # fmt: skip
    for name, x in (("q_sink", q_sink), ("gate", gate)):
        if x is not None and x.shape != q.shape:
            raise ValueError(f"decode_attention: {name}{tuple(x.shape)} is not shaped like q{tuple(q.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and pos.is_contiguous()):
        raise ValueError("decode_attention: the cache tensors must be contiguous (they are read in place)")
    g = h // hkv
    bg, bd = block(g), block(d)
    blocks = triton.cdiv(n, BN)
    n_split = max(1, min(blocks, triton.cdiv(PROGRAMS, b * hkv)))
    per_split = triton.cdiv(blocks, n_split)
    n_split = triton.cdiv(blocks, per_split)  # every split holds at least one block
    part_o = torch.empty(b * hkv * n_split * bg * bd, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(b * hkv * n_split * bg * 2, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    _split_kernel[(b * hkv, n_split)](
        q, q if q_sink is None else q_sink.contiguous(), k_cache, v_cache, pos, p, part_o, part_ml,
        n, sink, window, scale, hkv, g, d, per_split,
        HAS_SINKQ=q_sink is not None and sink > 0, BG=bg, BD=bd, BN=BN,
    )  # fmt: skip
    out = torch.empty_like(q)
    _combine_kernel[(b * h,)](
        part_o, part_ml, q if gate is None else gate.contiguous(), out, g, d, n_split,
        HAS_GATE=gate is not None, BG=bg, BD=bd,
    )  # fmt: skip
    return out

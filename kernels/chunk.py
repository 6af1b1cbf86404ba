"""Triton chunked gated delta rule (prefill); its torch reference is kernels/chunk_ref.py.

Same contract as the reference. Layouts: q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; state
[N, HV, K, V] float32. With `cu_seqlens` (int [N+1], B == 1) the T axis holds N packed sequences.

Chunked forward (chunk BT = 64), the WY / UT-transform method, in four launches:

1. `_solve_kernel`, one program per (chunk, value head): chunk-local cumsum of g, l2norm of k, the strictly lower
   A = beta_i k_i.k_j exp(gc_i - gc_j) in four 16-row sub-blocks, (I + A)^-1 by forward substitution on the diagonal
   sub-blocks and 2x2 block merges (fp32, tf32 or tf32x3 dots); also the keys decayed to the chunk end.
2. `_wu_kernel`, per (chunk, value head): w = (I + A)^-1 (beta k exp(gc)), u = (I + A)^-1 (beta v).
3. `_state_kernel`, one program per (sequence, value head, V block), sequential over the chunks: stores the state
   entering each chunk, v_new = u - w S, S = exp(gc_last) S + (k exp(gc_last - gc))^T v_new.
4. `_output_kernel`, per (chunk, value head): o = (q exp(gc)) S + tril(q k^T exp(gc_i - gc_j)) v_new.

Intermediates (w, u, v_new, per-chunk states) are kept in the input dtype for 16-bit inputs (tensor-core dots,
fp32 accumulate) and in float32 for float32 inputs (tf32x3 dots). The carried state is always float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from deltamem.kernels.recurrent_ref import check_inputs, check_state
from deltamem.kernels.triton_util import autotune, block, mm

# Stages of the chunked forward whose products take 16-bit operands for 16-bit inputs, as fla does (the others get
# fp32 operands and tf32 dots): a comma list of state, output. The solve always runs in fp32 (tf32 dots).
LOW_PRECISION = set(os.environ.get("DELTAMEM_GDN_LOW", "state,output").split(","))
CHUNK = 64
_SUB = 16  # rows of the sub-blocks of the in-chunk solve


@triton.jit
def _chunk_pos(cu_seqlens, chunk_indices, i_c, T, NT, IS_VARLEN: tl.constexpr):
    """(sequence, chunk in sequence, first token, sequence length) of global chunk i_c."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
        i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        i_n = (i_c // NT).to(tl.int64)
        i_t = (i_c % NT).to(tl.int64)
        bos = i_n * T
        seq_len = (T + 0 * i_n).to(tl.int64)
    return i_n, i_t, bos, seq_len


@triton.jit
def _load_keys(ptr, tok, m_t, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, L2: tl.constexpr):
    """Rows tok of a [*, H, K] tensor for head i_h as float32 [len(tok), BK], l2-normalised if L2."""
    o_k = tl.arange(0, BK)
    x = tl.load(ptr + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
    x = x.to(tl.float32)
    if L2:
        x = x * tl.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None]
    return x


@triton.jit
def _decayed_keys(
    k, kd, tok, m_t, gc, g_last, i_h, i_hv,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, L2: tl.constexpr,
):
    """Keys at rows tok (l2-normalised if L2); stores k exp(g_last - gc) to kd and returns k in kd's dtype."""
    x = _load_keys(k, tok, m_t, i_h, H, K, BK, L2)
    o_k = tl.arange(0, BK)
    dt = kd.dtype.element_ty
    p = kd + tok[:, None] * (HV * K) + i_hv * K + o_k[None, :]
    tl.store(p, (x * tl.exp(g_last - gc)[:, None]).to(dt), mask=m_t[:, None] & (o_k < K)[None, :])
    return x.to(dt)


@triton.jit
def _decayed_kkt(ka, kb, ba, ga, gb, DIAG: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """Sub-block of A: beta_i k_i.k_j exp(g_i - g_j), strictly lower on diagonal sub-blocks."""
    a = mm(ka, tl.trans(kb), PREC)
    if DIAG:
        o = tl.arange(0, BC)
        dec = tl.where(o[:, None] > o[None, :], tl.exp(ga[:, None] - gb[None, :]), 0.0)
    else:
        dec = tl.exp(ga[:, None] - gb[None, :])
    return a * dec * ba[:, None]


@triton.jit
def _unit_lower_inverse(a, BC: tl.constexpr):
    """(I + a)^-1 for a strictly lower [BC, BC] block: forward substitution, one row at a time."""
    o = tl.arange(0, BC)
    y = -a  # y = inverse - I; rows 0 and 1 are already final
    for i in range(2, BC):
        row = tl.sum(tl.where(o[:, None] == i, -a, 0.0), 0)
        row = row + tl.sum(row[:, None] * y, 0)  # rows j < i of y are final, entries j >= i of row are 0
        y = tl.where(o[:, None] == i, row[None, :], y)
    return y + tl.where(o[:, None] == o[None, :], 1.0, 0.0)



@autotune([{}], [4, 2, 1], [1], key=["H", "HV", "K", "BK", "IS_VARLEN", "PREC"])
@triton.jit(do_not_specialize=["T", "NT"])
def _solve_kernel(
    k, g, beta, gc, ai, kd, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, L2: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """Chunk-local cumsum of g (to gc), (I + A)^-1 (to ai, [tokens, HV, 4 * BC], row t = token t) and the keys
    decayed to the chunk end, k exp(gc_last - gc) (to kd, [tokens, HV, K]), which the state pass reads."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    _, i_t, bos, seq_len = _chunk_pos(cu_seqlens, chunk_indices, i_c, T, NT, IS_VARLEN)
    o_c = tl.arange(0, BC)
    r0 = i_t * (4 * BC)
    # four sub-blocks of BC rows: positions, masks, keys, beta, chunk-local cumsum of g
    p0, p1, p2, p3 = r0 + o_c, r0 + BC + o_c, r0 + 2 * BC + o_c, r0 + 3 * BC + o_c
    m0, m1, m2, m3 = p0 < seq_len, p1 < seq_len, p2 < seq_len, p3 < seq_len
    t0, t1, t2, t3 = bos + p0, bos + p1, bos + p2, bos + p3
    b0 = tl.load(beta + t0 * HV + i_hv, mask=m0, other=0.0).to(tl.float32)
    b1 = tl.load(beta + t1 * HV + i_hv, mask=m1, other=0.0).to(tl.float32)
    b2 = tl.load(beta + t2 * HV + i_hv, mask=m2, other=0.0).to(tl.float32)
    b3 = tl.load(beta + t3 * HV + i_hv, mask=m3, other=0.0).to(tl.float32)
    g0 = tl.load(g + t0 * HV + i_hv, mask=m0, other=0.0).to(tl.float32)
    g1 = tl.load(g + t1 * HV + i_hv, mask=m1, other=0.0).to(tl.float32)
    g2 = tl.load(g + t2 * HV + i_hv, mask=m2, other=0.0).to(tl.float32)
    g3 = tl.load(g + t3 * HV + i_hv, mask=m3, other=0.0).to(tl.float32)
    g0 = tl.cumsum(g0, 0)
    g1 = tl.cumsum(g1, 0) + tl.sum(tl.where(o_c == BC - 1, g0, 0.0), 0)
    g2 = tl.cumsum(g2, 0) + tl.sum(tl.where(o_c == BC - 1, g1, 0.0), 0)
    g3 = tl.cumsum(g3, 0) + tl.sum(tl.where(o_c == BC - 1, g2, 0.0), 0)
    tl.store(gc + t0 * HV + i_hv, g0, mask=m0)
    tl.store(gc + t1 * HV + i_hv, g1, mask=m1)
    tl.store(gc + t2 * HV + i_hv, g2, mask=m2)
    tl.store(gc + t3 * HV + i_hv, g3, mask=m3)
    g_last = tl.sum(tl.where(o_c == BC - 1, g3, 0.0), 0)  # padded rows add 0: this is gc at the last token
    # keys one sub-block at a time (one float32 tile live): normalised, stored decayed, narrowed to the stage dtype
    k0 = _decayed_keys(k, kd, t0, m0, g0, g_last, i_h, i_hv, H, HV, K, BK, L2)
    k1 = _decayed_keys(k, kd, t1, m1, g1, g_last, i_h, i_hv, H, HV, K, BK, L2)
    k2 = _decayed_keys(k, kd, t2, m2, g2, g_last, i_h, i_hv, H, HV, K, BK, L2)
    k3 = _decayed_keys(k, kd, t3, m3, g3, g_last, i_h, i_hv, H, HV, K, BK, L2)

    # diagonal sub-blocks of (I + A)^-1, then the off-diagonal ones by 2x2 block inversion (16 -> 32 -> 64 rows)
    d0 = _unit_lower_inverse(_decayed_kkt(k0, k0, b0, g0, g0, True, BC, PREC), BC)
    d1 = _unit_lower_inverse(_decayed_kkt(k1, k1, b1, g1, g1, True, BC, PREC), BC)
    d2 = _unit_lower_inverse(_decayed_kkt(k2, k2, b2, g2, g2, True, BC, PREC), BC)
    d3 = _unit_lower_inverse(_decayed_kkt(k3, k3, b3, g3, g3, True, BC, PREC), BC)
    a10 = _decayed_kkt(k1, k0, b1, g1, g0, False, BC, PREC)
    a20 = _decayed_kkt(k2, k0, b2, g2, g0, False, BC, PREC)
    a21 = _decayed_kkt(k2, k1, b2, g2, g1, False, BC, PREC)
    a30 = _decayed_kkt(k3, k0, b3, g3, g0, False, BC, PREC)
    a31 = _decayed_kkt(k3, k1, b3, g3, g1, False, BC, PREC)
    a32 = _decayed_kkt(k3, k2, b3, g3, g2, False, BC, PREC)
    x10 = -mm(mm(d1, a10, PREC), d0, PREC)
    x32 = -mm(mm(d3, a32, PREC), d2, PREC)
    # lower-left 32x32 quarter: -inv(hi) [a20 a21; a30 a31] inv(lo)
    n20 = mm(a20, d0, PREC) + mm(a21, x10, PREC)
    n21 = mm(a21, d1, PREC)
    n30 = mm(a30, d0, PREC) + mm(a31, x10, PREC)
    n31 = mm(a31, d1, PREC)
    x20 = -mm(d2, n20, PREC)
    x21 = -mm(d2, n21, PREC)
    x30 = -(mm(x32, n20, PREC) + mm(d3, n30, PREC))
    x31 = -(mm(x32, n21, PREC) + mm(d3, n31, PREC))

    z = tl.zeros([BC, BC], dtype=tl.float32)
    pa = ai + i_hv * (4 * BC) + o_c[None, :]
    _store_row_blocks(pa + t0[:, None] * (HV * 4 * BC), m0, d0, z, z, z, BC)
    _store_row_blocks(pa + t1[:, None] * (HV * 4 * BC), m1, x10, d1, z, z, BC)
    _store_row_blocks(pa + t2[:, None] * (HV * 4 * BC), m2, x20, x21, d2, z, BC)
    _store_row_blocks(pa + t3[:, None] * (HV * 4 * BC), m3, x30, x31, x32, d3, BC)


@triton.jit
def _store_row_blocks(p, m, c0, c1, c2, c3, BC: tl.constexpr):
    """One row block [c0 c1 c2 c3] of a [4 BC, 4 BC] matrix, rows masked by m."""
    tl.store(p, c0.to(p.dtype.element_ty), mask=m[:, None])
    tl.store(p + BC, c1.to(p.dtype.element_ty), mask=m[:, None])
    tl.store(p + 2 * BC, c2.to(p.dtype.element_ty), mask=m[:, None])
    tl.store(p + 3 * BC, c3.to(p.dtype.element_ty), mask=m[:, None])


@autotune([{}], [4, 8], [2], key=["H", "HV", "K", "V", "BK", "BV", "IS_VARLEN", "PREC"])
@triton.jit(do_not_specialize=["T", "NT"])
def _wu_kernel(
    k, v, beta, gc, ai, w, u, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, L2: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """w = (I + A)^-1 (beta k exp(gc)) and u = (I + A)^-1 (beta v) for one chunk and value head."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    _, i_t, bos, seq_len = _chunk_pos(cu_seqlens, chunk_indices, i_c, T, NT, IS_VARLEN)
    DT = w.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    pos = i_t * BT + o_t
    m_t = pos < seq_len
    tok = bos + pos
    b_a = tl.load(ai + (tok[:, None] * HV + i_hv) * BT + o_t[None, :], mask=m_t[:, None], other=0.0).to(DT)
    b_b = tl.load(beta + tok * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    b_g = tl.load(gc + tok * HV + i_hv, mask=m_t, other=0.0)
    b_k = _load_keys(k, tok, m_t, i_h, H, K, BK, L2) * (b_b * tl.exp(b_g))[:, None]
    b_w = mm(b_a, b_k.to(DT), PREC)
    tl.store(w + (tok[:, None] * HV + i_hv) * K + o_k[None, :], b_w.to(DT), mask=m_t[:, None] & (o_k < K)[None, :])
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (tok[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0.0) * b_b[:, None]
        b_u = mm(b_a, b_v.to(DT), PREC)
        tl.store(u + (tok[:, None] * HV + i_hv) * V + o_v[None, :], b_u.to(DT), mask=m_tv)


@autotune([{"BV": 64}, {"BV": 32}], [4], [2, 3], key=["H", "HV", "K", "V", "BK", "IS_VARLEN", "PREC", "LOW"])
@triton.jit(do_not_specialize=["T", "NT"])
def _state_kernel(
    kd, w, u, gc, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, L2: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr, LOW: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = (i_nh // HV).to(tl.int64), i_nh % HV
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        seq_len = (T + 0 * i_n).to(tl.int64)
        c0 = i_n * NT
    n_chunks = tl.cdiv(seq_len, BT)
    DT = w.dtype.element_ty
    OT = DT if LOW else tl.float32  # operands of the state products
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_k = o_k < K
    m_v = o_v < V
    mkv = m_k[:, None] & m_v[None, :]
    s_off = o_k[:, None] * V + o_v[None, :]
    if USE_H0:
        b_h = tl.load(h0 + (i_n * HV + i_hv) * K * V + s_off, mask=mkv, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
    # this sequence's and head's bases; the loop steps them a chunk at a time over loop-invariant tile offsets
    w += (bos * HV + i_hv) * K
    kd += (bos * HV + i_hv) * K
    u += (bos * HV + i_hv) * V
    v_new += (bos * HV + i_hv) * V
    gc += bos * HV + i_hv
    h += (c0 * HV + i_hv) * K * V
    p_w = o_t[:, None] * (HV * K) + o_k[None, :]  # [BT, BK] rows of w
    p_k = o_k[:, None] + o_t[None, :] * (HV * K)  # [BK, BT]: kd read transposed
    p_u = o_t[:, None] * (HV * V) + o_v[None, :]
    # each chunk's decay is loaded one chunk ahead: a load the pipeliner leaves alone would otherwise stall the
    # sequential chain right before the state update
    g_next = tl.load(gc + (tl.minimum(BT, seq_len) - 1) * HV, mask=seq_len > 0, other=0.0)  # none if empty
    for i_t in range(n_chunks):
        t0 = i_t * BT
        g_last = g_next
        g_next = tl.load(gc + (tl.minimum(t0 + 2 * BT, seq_len) - 1) * HV)
        tl.store(h + i_t * (HV * K * V) + s_off, b_h.to(DT), mask=mkv)
        m_t = t0 + o_t < seq_len
        m_tv = m_t[:, None] & m_v[None, :]
        b_w = tl.load(w + t0 * (HV * K) + p_w, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_u = tl.load(u + t0 * (HV * V) + p_u, mask=m_tv, other=0.0).to(tl.float32)
        b_v = b_u - mm(b_w.to(OT), b_h.to(OT), PREC)
        tl.store(v_new + t0 * (HV * V) + p_u, b_v.to(DT), mask=m_tv)
        b_k = tl.load(kd + t0 * (HV * K) + p_k, mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_h = mm(b_k.to(OT), b_v.to(OT), PREC, b_h * tl.exp(g_last))  # the product accumulates into the state
    if STORE_HT:
        tl.store(ht + (i_n * HV + i_hv) * K * V + s_off, b_h, mask=mkv)


@autotune([{"BV": 64}], [4, 8], [2, 3], key=["H", "HV", "K", "V", "BK", "IS_VARLEN", "PREC", "LOW"])
@triton.jit(do_not_specialize=["T", "NT"])
def _output_kernel(
    q, k, gc, h, v_new, o, scale, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, L2: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, LOW: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_h = i_hv // (HV // H)
    _, i_t, bos, seq_len = _chunk_pos(cu_seqlens, chunk_indices, i_c, T, NT, IS_VARLEN)
    OT = h.dtype.element_ty if LOW else tl.float32  # operands of the products
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    pos = i_t * BT + o_t
    m_t = pos < seq_len
    tok = bos + pos
    b_q = _load_keys(q, tok, m_t, i_h, H, K, BK, L2) * scale
    b_k = _load_keys(k, tok, m_t, i_h, H, K, BK, L2)
    b_g = tl.load(gc + tok * HV + i_hv, mask=m_t, other=0.0)
    b_s = mm(b_q.to(OT), tl.trans(b_k.to(OT)), PREC)
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[None, :]
    b_s = tl.where(causal, b_s * tl.exp(b_g[:, None] - b_g[None, :]), 0.0)
    b_q = b_q * tl.exp(b_g)[:, None]
    b_s = b_s.to(OT)
    b_q = b_q.to(OT)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_h = tl.load(
            h + (i_c * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=(o_k < K)[:, None] & (o_v < V)[None, :],
            other=0.0,
        )
        b_v = tl.load(v_new + (tok[:, None] * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0.0)
        b_o = mm(b_q, b_h.to(OT), PREC) + mm(b_s, b_v.to(OT), PREC)
        tl.store(o + (tok[:, None] * HV + i_hv) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)



def _stage_dtype(*xs: torch.Tensor) -> torch.dtype:
    """dtype of the intermediates: 16-bit when every input is 16-bit (bf16 wins a mix), else float32."""
    if all(x.dtype in (torch.bfloat16, torch.float16) for x in xs):
        return torch.float16 if all(x.dtype == torch.float16 for x in xs) else torch.bfloat16
    return torch.float32



def chunk_indices_for(cu_seqlens: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk_indices int32 [NC, 2] of (sequence, chunk in sequence), chunk_offsets int32 [N + 1])."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_chunks = (lens + chunk - 1) // chunk
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.long, device=cu_seqlens.device)
    offsets[1:] = n_chunks.cumsum(0)
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), n_chunks)
    within = torch.arange(seq.numel(), device=cu_seqlens.device) - offsets[seq]
    return torch.stack([seq, within], 1).to(torch.int32).contiguous(), offsets.to(torch.int32)


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float | None = None, initial_state: torch.Tensor | None = None, use_qk_l2norm: bool = True,
    chunk_size: int = CHUNK, cu_seqlens: torch.Tensor | None = None, output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (prefill): the contract of kernels/chunk_ref.py's op.

    With cu_seqlens (int [N+1], B == 1) the sequences are independent and initial_state / the final state have N
    rows. Returns (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] float32, or None if not asked for).
    """
    check_inputs(q, k, v, g, beta)
    if chunk_size != CHUNK:
        raise ValueError(f"the Triton chunked kernel uses chunk_size {CHUNK}, got {chunk_size}")
    b, t, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {b}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != t:
            raise ValueError(f"cu_seqlens must be 1-d and end at T={t}, got {cu_seqlens.tolist()}")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        n = cu_seqlens.numel() - 1
    else:
        n = b
    check_state(initial_state, (n, hv, dk, dv))
    scale = dk**-0.5 if scale is None else float(scale)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.float().contiguous()
    ht = torch.empty(n, hv, dk, dv, dtype=torch.float32, device=q.device) if output_final_state else None
    o = torch.empty_like(v)
    if t == 0:
        if ht is not None:
            ht.copy_(h0 if h0 is not None else torch.zeros_like(ht))
        return o, ht

    if cu_seqlens is None:
        nt = triton.cdiv(t, CHUNK)
        n_total, chunk_indices, chunk_offsets = b * nt, None, None
    else:
        nt = 0
        chunk_indices, chunk_offsets = chunk_indices_for(cu_seqlens)
        n_total = chunk_indices.shape[0]
    st = _stage_dtype(q, k, v)
    low = st != torch.float32
    # fp32 inputs: tf32x3 products (about fp32 accuracy on tensor cores; IEEE fp32 dots compile very slowly)
    prec = "tf32" if low else "tf32x3"
    bk = block(dk)
    common = dict(T=t, NT=nt, H=h, HV=hv, K=dk, BK=bk, L2=use_qk_l2norm, IS_VARLEN=cu_seqlens is not None)

    gc = torch.empty(b, t, hv, dtype=torch.float32, device=q.device)
    w = torch.empty(b, t, hv, dk, dtype=st, device=q.device)
    u = torch.empty(b, t, hv, dv, dtype=st, device=q.device)
    ai = torch.empty(b, t, hv, CHUNK, dtype=st, device=q.device)
    kd = torch.empty(b, t, hv, dk, dtype=st, device=q.device)
    _solve_kernel[(n_total, hv)](k, g, beta, gc, ai, kd, cu_seqlens, chunk_indices, BC=_SUB, PREC=prec, **common)
    _wu_kernel[(n_total, hv)](
        k, v, beta, gc, ai, w, u, cu_seqlens, chunk_indices, BT=CHUNK, V=dv, BV=min(64, block(dv)), PREC=prec, **common
    )
    hs = torch.empty(n_total, hv, dk, dv, dtype=st, device=q.device)
    v_new = torch.empty_like(u)
    _state_kernel[lambda meta: (triton.cdiv(dv, meta["BV"]), n * hv)](
        kd,
        w,
        u,
        gc,
        hs,
        v_new,
        h0,
        ht,
        cu_seqlens,
        chunk_offsets,
        BT=CHUNK,
        USE_H0=h0 is not None,
        STORE_HT=ht is not None,
        PREC=prec,
        LOW="state" in LOW_PRECISION and low,
        V=dv,
        **common,
    )
    _output_kernel[(n_total, hv)](
        q,
        k,
        gc,
        hs,
        v_new,
        o,
        scale,
        cu_seqlens,
        chunk_indices,
        BT=CHUNK,
        PREC=prec,
        LOW="output" in LOW_PRECISION and low,
        V=dv,
        **common,
    )
    return o, ht


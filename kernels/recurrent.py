"""Triton fused recurrent gated delta rule (decode, small T); its torch reference is kernels/recurrent_ref.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltamem.kernels.recurrent_ref import check_inputs, check_state
from deltamem.kernels.triton_util import block


@triton.jit(do_not_specialize=["T"])
def _recurrent_kernel(
    q, k, v, g, beta, o, h0, ht, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = (i_nh // HV).to(tl.int64), i_nh % HV
    i_h = i_hv // (HV // H)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk, mv = o_k < K, o_v < V
    s_off = (i_n * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_H0:
        b_h = tl.load(h0 + s_off, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(T):
        tok = i_n * T + i_t
        b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=mk, other=0.0).to(tl.float32)
        if L2:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + 1e-6)
        b_v = tl.load(v + (tok * HV + i_hv) * V + o_v, mask=mv, other=0.0).to(tl.float32)
        b_g = tl.load(g + tok * HV + i_hv).to(tl.float32)
        b_b = tl.load(beta + tok * HV + i_hv).to(tl.float32)
        b_h = b_h * tl.exp(b_g)
        b_v = (b_v - tl.sum(b_h * b_k[:, None], 0)) * b_b
        b_h = b_h + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)
        tl.store(o + (tok * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:  # each program reads and writes only its own [K, BV] block: ht may be h0 (in place)
        tl.store(ht + s_off, b_h, mask=mk[:, None] & mv[None, :])


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float | None = None, initial_state: torch.Tensor | None = None, use_qk_l2norm: bool = True,
    inplace: bool = False, output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused recurrent gated delta rule (decode, small T): the contract of kernels/recurrent_ref.py's op.

    inplace=True updates initial_state (float32, contiguous) and returns it as the final state: no copy.
    """
    check_inputs(q, k, v, g, beta)
    b, t, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    check_state(initial_state, (b, hv, dk, dv))
    if inplace:
        if initial_state is None or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError("inplace=True needs a contiguous float32 initial_state")
        ht = initial_state
        h0 = initial_state
    else:
        h0 = None if initial_state is None else initial_state.float().contiguous()
        ht = torch.empty(b, hv, dk, dv, dtype=torch.float32, device=q.device) if output_final_state else None
    scale = dk**-0.5 if scale is None else float(scale)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty_like(v)
    bv = min(32, block(dv))
    _recurrent_kernel[(triton.cdiv(dv, bv), b * hv)](
        q,
        k,
        v,
        g,
        beta,
        o,
        h0,
        ht,
        scale,
        t,
        H=h,
        HV=hv,
        K=dk,
        V=dv,
        BK=block(dk),
        BV=bv,
        L2=use_qk_l2norm,
        USE_H0=h0 is not None,
        STORE_HT=ht is not None,
        num_warps=4 if block(dk) >= 128 else 2,
    )
    return o, ht


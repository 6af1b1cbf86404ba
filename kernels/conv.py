"""Triton depthwise causal conv1d + SiLU (Gated DeltaNet's short conv); its torch reference is kernels/conv_ref.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltamem.kernels.triton_util import block


@triton.jit
def _conv_new_state(x_base, s_base, out, T, C, o_c, m_c, W: tl.constexpr, BW: tl.constexpr):
    """The new conv state: the last W - 1 rows of cat(state, x)."""
    o_r = tl.arange(0, BW)
    src = T + o_r
    in_x = (src >= W - 1)[:, None]
    m = (o_r < W - 1)[:, None] & m_c[None, :]
    xv = tl.load(x_base + (src - (W - 1))[:, None] * C + o_c[None, :], mask=m & in_x, other=0.0).to(tl.float32)
    sv = tl.load(s_base + src[:, None] * C + o_c[None, :], mask=m & ~in_x, other=0.0).to(tl.float32)
    # In place (out is the state): every thread of the program has read the old state before any writes it.
    tl.debug_barrier()
    tl.store(out + o_r[:, None] * C + o_c[None, :], (xv + sv).to(out.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def _conv_kernel(
    x, weight, state, y, new_state, T, C, W: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr
):
    i_c, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    o_t = i_t * BT + tl.arange(0, BT)
    m_c, m_t = o_c < C, o_t < T
    x_base, s_base = x + i_b * T * C, state + i_b * (W - 1) * C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(W):
        j = o_t + i  # index into cat(state, x), of length W - 1 + T
        in_x = (j >= W - 1)[:, None]
        m = m_t[:, None] & m_c[None, :]
        xv = tl.load(x_base + (j - (W - 1))[:, None] * C + o_c[None, :], mask=m & in_x, other=0.0).to(tl.float32)
        sv = tl.load(s_base + j[:, None] * C + o_c[None, :], mask=m & ~in_x, other=0.0).to(tl.float32)
        wi = tl.load(weight + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)
        acc += (xv + sv) * wi[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(y + i_b * T * C + o_t[:, None] * C + o_c[None, :], out.to(y.dtype.element_ty), mask=m_t[:, None] & m_c)
    if i_t == 0:
        _conv_new_state(x_base, s_base, new_state + i_b * (W - 1) * C, T, C, o_c, m_c, W, BW)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU continuing from state; x [T, C] or [B, T, C], state [W-1, C] or [B, W-1, C].

    Returns (y like x, new state like state); the new state is a new tensor, or `state` itself with inplace=True
    (one program reads and writes a channel block's state, with a barrier between its reads and its writes).
    """
    batched = x.dim() == 3
    xb, sb = (x, state) if batched else (x[None], state[None])
    b, t, c = xb.shape
    w = weight.shape[1]
    if weight.shape[0] != c or sb.shape != (b, w - 1, c):
        raise ValueError(f"causal_conv1d: x{tuple(x.shape)} weight{tuple(weight.shape)} state{tuple(state.shape)}")
    if inplace and not state.is_contiguous():
        raise ValueError("causal_conv1d: inplace=True needs a contiguous state")
    xb, sb, weight = xb.contiguous(), sb.contiguous(), weight.contiguous()
    y = torch.empty_like(xb)
    new_state = sb if inplace else torch.empty_like(sb)
    bt = min(64, block(t))
    bc = 256 if t > 1 else 128  # decode: many small programs (1024 channels each left most SMs idle: 12 us)
    _conv_kernel[(triton.cdiv(c, bc), max(1, triton.cdiv(t, bt)), b)](
        xb, weight, sb, y, new_state, t, c, W=w, BW=triton.next_power_of_2(max(w - 1, 1)), BT=bt, BC=bc
    )
    if inplace:
        return (y if batched else y[0]), state
    return (y, new_state) if batched else (y[0], new_state[0])

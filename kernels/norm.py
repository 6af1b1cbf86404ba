"""Triton RMSNorms: Gated DeltaNet's gated output norm, and the decoder's norm with the residual add fused in (decode
runs ~80 of them a token). The torch references are kernels/norm_ref.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltamem.kernels.triton_util import block


@triton.jit
def _gated_norm_kernel(x, gate, weight, y, N, D: tl.constexpr, eps, BR: tl.constexpr, BD: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < N)[:, None] & (o_d < D)[None, :]
    off = o_r[:, None] * D + o_d[None, :]
    b_x = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(gate + off, mask=m, other=0.0).to(tl.float32)
    b_w = tl.load(weight + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(b_x * b_x, 1) / D + eps)
    b_n = (b_x * rstd[:, None]).to(x.dtype.element_ty).to(tl.float32)  # rounded like the torch module
    out = b_w[None, :] * b_n * (b_g * tl.sigmoid(b_g))
    tl.store(y + off, out.to(y.dtype.element_ty), mask=m)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rmsnorm(x) over the last dim * weight * silu(gate), in x's dtype; x and gate of one shape [..., D]."""
    if gate.shape != x.shape or weight.shape != (x.shape[-1],):
        raise ValueError(f"gated_rms_norm: x{tuple(x.shape)} gate{tuple(gate.shape)} weight{tuple(weight.shape)}")
    d = x.shape[-1]
    x2, g2 = x.reshape(-1, d).contiguous(), gate.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    n = x2.shape[0]
    bd = block(d)
    br = max(1, min(16, 4096 // bd))
    _gated_norm_kernel[(triton.cdiv(n, br),)](x2, g2, weight.contiguous(), y, n, D=d, eps=eps, BR=br, BD=bd)
    return y.view(x.shape)


@triton.jit
def _rms_norm_kernel(
    x, y, weight, out, s_out, N, D: tl.constexpr, eps, MODE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr
):
    """MODE 0: out = norm(x). MODE 1 (pre-norm): s = x + y, out = norm(s). MODE 2 (post-norm): out = x + norm(y).
    norm(z) = z * rsqrt(mean(z^2) + eps) * weight in float32, rounded once; sums rounded like torch's."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < N)[:, None] & (o_d < D)[None, :]
    off = o_r[:, None] * D + o_d[None, :]
    b_x = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
    b_w = tl.load(weight + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    if MODE == 0:
        z = b_x
    else:
        b_y = tl.load(y + off, mask=m, other=0.0).to(tl.float32)
        if MODE == 1:
            z = (b_x + b_y).to(out.dtype.element_ty).to(tl.float32)
            tl.store(s_out + off, z.to(s_out.dtype.element_ty), mask=m)
        else:
            z = b_y
    rstd = tl.rsqrt(tl.sum(z * z, 1) / D + eps)
    n = z * rstd[:, None] * b_w[None, :]
    if MODE == 2:
        n = b_x + n.to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + off, n.to(out.dtype.element_ty), mask=m)


def _rms_norm(mode: int, x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float):
    d = x.shape[-1]
    if weight.shape != (d,) or (y is not None and y.shape != x.shape):
        shapes = f"x{tuple(x.shape)} y{None if y is None else tuple(y.shape)} weight{tuple(weight.shape)}"
        raise ValueError(f"rms_norm: {shapes}")
    x2 = x.reshape(-1, d).contiguous()
    y2 = x2 if y is None else y.reshape(-1, d).contiguous()
    out = torch.empty_like(x2)
    s = torch.empty_like(x2) if mode == 1 else out
    n = x2.shape[0]
    bd = block(d)
    br = max(1, min(16, 2048 // bd))
    _rms_norm_kernel[(triton.cdiv(n, br),)](
        x2, y2, weight.contiguous(), out, s, n, D=d, eps=eps, MODE=mode, BR=br, BD=bd, num_warps=4 if bd >= 2048 else 2
    )
    return out.view(x.shape), s.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim, computed in float32 and rounded once to x's dtype."""
    return _rms_norm(0, x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + y, rms_norm(x + y)): a pre-norm block's residual add and the next norm in one pass."""
    out, s = _rms_norm(1, x, y, weight, eps)
    return s, out


def rms_norm_add(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x + rms_norm(y): a post-norm block's norm and residual add in one pass."""
    return _rms_norm(2, x, y, weight, eps)[0]

"""Triton elementwise ops of a decode step: Gated DeltaNet's gates (g, beta) and the gated MLP's silu(gate) * up.
The torch references are kernels/gates_ref.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltamem.kernels.triton_util import block


@triton.jit
def _delta_gates_kernel(a, b, a_log, dt_bias, g, beta, N, HV: tl.constexpr, beta_scale, BN: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m = o < N
    h = o % HV
    b_a = tl.load(a + o, mask=m, other=0.0).to(tl.float32) + tl.load(dt_bias + h, mask=m, other=0.0).to(tl.float32)
    softplus = tl.where(b_a > 20.0, b_a, tl.log(1.0 + tl.exp(tl.minimum(b_a, 20.0))))
    b_g = -tl.exp(tl.load(a_log + h, mask=m, other=0.0).to(tl.float32)) * softplus
    tl.store(g + o, b_g, mask=m)
    sig = tl.sigmoid(tl.load(b + o, mask=m, other=0.0).to(tl.float32)).to(beta.dtype.element_ty).to(tl.float32)
    tl.store(beta + o, (sig * beta_scale).to(beta.dtype.element_ty), mask=m)


def delta_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's log decay g = -exp(A_log) * softplus(a + dt_bias) (float32) and write strength
    beta = sigmoid(b) * beta_scale (b's dtype), for a, b [..., HV]: one kernel instead of eight."""
    hv = a.shape[-1]
    if b.shape != a.shape or a_log.shape != (hv,) or dt_bias.shape != (hv,):
        raise ValueError(f"delta_gates: a{tuple(a.shape)} b{tuple(b.shape)} A_log{tuple(a_log.shape)}")
    a2, b2 = a.contiguous(), b.contiguous()
    g = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    beta = torch.empty_like(b2)
    n = a2.numel()
    bn = min(1024, block(n))
    _delta_gates_kernel[(triton.cdiv(n, bn),)](
        a2, b2, a_log.contiguous(), dt_bias.contiguous(), g, beta, n, HV=hv, beta_scale=float(beta_scale), BN=bn
    )
    return g, beta


@triton.jit
def _silu_mul_kernel(gate, up, out, N, s_g, s_u, BI: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows on axis 0: grid axis 1 is limited to 65535
    o = tl.program_id(1) * BI + tl.arange(0, BI)
    m = o < N
    b_g = tl.load(gate + row * s_g + o, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(up + row * s_u + o, mask=m, other=0.0).to(tl.float32)
    silu = (b_g * tl.sigmoid(b_g)).to(out.dtype.element_ty).to(tl.float32)  # rounded as torch's F.silu output is
    tl.store(out + row * N + o, (silu * b_u).to(out.dtype.element_ty), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one kernel; gate and up may be row slices of one fused projection output."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate{tuple(gate.shape)} {gate.dtype}, up{tuple(up.shape)} {up.dtype}")
    i = gate.shape[-1]
    g2, u2 = gate.reshape(-1, i), up.reshape(-1, i)
    g2, u2 = (x if x.stride(-1) == 1 else x.contiguous() for x in (g2, u2))
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    bi = min(512, block(i))
    if out.numel():
        _silu_mul_kernel[(out.shape[0], triton.cdiv(i, bi))](g2, u2, out, i, g2.stride(0), u2.stride(0), BI=bi)
    return out.view(gate.shape)

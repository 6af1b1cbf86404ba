"""The RMSNorms in plain torch: the ground truth of kernels/norm.py, and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rmsnorm(x) over the last dim * weight * silu(gate), in x's dtype: model/layers.py GatedRMSNorm's formula."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim, computed in float32 and rounded once to x's dtype (F.rms_norm)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + y, rms_norm(x + y)): a pre-norm block's residual add and the next norm."""
    s = x + y
    return s, rms_norm(s, weight, eps)


def rms_norm_add(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x + rms_norm(y): a post-norm block's norm and residual add."""
    return x + rms_norm(y, weight, eps)

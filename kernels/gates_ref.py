"""Gated DeltaNet's gates and the gated MLP's activation in plain torch: the ground truth of kernels/gates.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def delta_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's log decay g = -exp(A_log) * softplus(a + dt_bias) (float32) and write strength
    beta = sigmoid(b) * beta_scale (in b's dtype): model/layers.py GatedDeltaNet's formulas."""
    return -a_log.float().exp() * F.softplus(a.float() + dt_bias), b.sigmoid() * beta_scale


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the gated MLP's activation."""
    return F.silu(gate) * up

"""Gated DeltaNet's short conv in plain torch: the ground truth of kernels/conv.py, and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution with SiLU, continuing from `state`.

    Args:
        x: [T, C] new inputs; weight: [C, W] taps; state: [W-1, C], the previous W-1 inputs (zeros at start).
        inplace: the new state is copied into `state`, which is returned as the new state.
    Returns:
        y: [T, C] = silu(sum_i weight[:, i] * xx[t + i]) with xx = cat(state, x); new state: [W-1, C].
    """
    xx = torch.cat([state.to(x.dtype), x], dim=0)  # [T+W-1, C]
    t, w = x.shape[0], weight.shape[1]
    weight = weight.to(x.dtype)
    # W shifted multiply-adds: for these few taps this beats conv1d, whose CPU path is slow on [1, C, T] shapes.
    y = xx[:t] * weight[:, 0]
    for i in range(1, w):
        y = y + xx[i : i + t] * weight[:, i]
    new = xx[xx.shape[0] - state.shape[0] :].to(state.dtype)
    return F.silu(y), (state.copy_(new) if inplace else new)


def causal_conv1d_rows(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d for one new input of each of B independent streams.

    Args:
        x: [B, C], row b the next input of stream b; weight: [C, W]; state: [B, W-1, C].
    Returns:
        y: [B, C], each row what causal_conv1d(x[b:b+1], weight, state[b]) gives; new state: [B, W-1, C].
    """
    xx = torch.cat([state.to(x.dtype), x[:, None]], dim=1)  # [B, W, C]
    # the same multiply-adds in the same order as causal_conv1d, accumulated in float32 as the Triton kernel does
    acc, weight = xx.float(), weight.float()
    y = acc[:, 0] * weight[:, 0]
    for i in range(1, weight.shape[1]):
        y = y + acc[:, i] * weight[:, i]
    return F.silu(y).to(x.dtype), xx[:, 1:].to(state.dtype)

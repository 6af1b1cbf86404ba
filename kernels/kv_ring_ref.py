"""An attention layer's decode write into its bounded KV ring, in plain torch: the ground truth of kernels/kv_ring.py,
and the CPU path. Which slot and which keys: the window rule, kernels/window.py."""

from __future__ import annotations

import torch

from deltamem.kernels.window import ring_slots, visible


def kv_step(
    k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
    sink: int, window: int,
) -> torch.Tensor:
    """Write one decode token into a bounded KV ring (model/cache.py KVWindow) and return its attention mask.

    k_cache, v_cache: [Hkv, sink + window, D], written in place at the token's slot; pos: [sink + window] int64,
    the position each slot holds (-1: empty); k, v: [Hkv, D]; p: [1] int64 on the device, the token's position.
    Returns the additive mask [sink + window] in the cache's dtype: 0 where the token may attend (slots holding
    a sink token or one of the last `window` positions), -inf elsewhere."""
    slot = ring_slots(p, sink, window)
    k_cache.index_copy_(1, slot, k[:, None])
    v_cache.index_copy_(1, slot, v[:, None])
    pos.index_copy_(0, slot, p)
    allowed = visible(pos, p, sink, window)
    return torch.zeros(pos.shape, dtype=k_cache.dtype, device=pos.device).masked_fill(~allowed, float("-inf"))

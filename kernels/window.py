"""The one window rule of a bounded attention cache (StreamingLLM's sink + window), in plain torch.

An attention layer keeps the first `sink` tokens of a sequence plus the last `window` ones. Two functions say it,
and every place that needs it calls them: the KV cache (model/cache.py KVWindow, KVStack), the batched training
forward (model/train.py) and the kv_step reference (kernels/kv_ring_ref.py). The Triton kv_step kernel
(kernels/kv_ring.py) computes both inline, each line citing its function here.

- `visible(kpos, p, sink, window)`: whether a query at position p may attend the key at position kpos.
- `ring_slots(p, sink, window)`: the slot of the cache's buffer that holds position p.
"""

from __future__ import annotations

import torch


def visible(kpos, p, sink: int, window: int | None):
    """Whether the query at position p sees the key at position kpos (broadcast tensors, or ints): the key is filled
    (kpos >= 0: an empty cache slot holds -1), not after the query (kpos <= p), and one of the first `sink` tokens
    (kpos < sink) or of the last `window` positions up to p (kpos > p - window). window None: full causal attention.

    Example:
        >>> visible(torch.arange(10), 9, sink=2, window=3)  # keys 0, 1 (sinks) and 7, 8, 9
        tensor([ True,  True, False, False, False, False, False,  True,  True,  True])
    """
    seen = (kpos >= 0) & (kpos <= p)
    return seen if window is None else seen & ((kpos < sink) | (kpos > p - window))


def ring_slots(p, sink: int, window: int):
    """The slot of position p (an int, or an int64 tensor of them) in a bounded cache of sink + window slots: the
    first `sink` positions keep their own slots, later ones cycle through the `window` slots after them.

    Example:
        >>> ring_slots(torch.arange(8), sink=2, window=3)
        tensor([0, 1, 2, 3, 4, 2, 3, 4])
    """
    wrapped = sink + (p - sink) % window
    if isinstance(p, int):
        return p if p < sink else wrapped
    return torch.where(p < sink, p, wrapped)

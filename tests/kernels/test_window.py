"""The window rule (kernels/window.py) against a plain Python statement of StreamingLLM's cache: the first `sink`
tokens stay, then a ring of `window` slots keeps the most recent positions."""

import pytest
import torch

from deltamem.kernels.window import ring_slots, visible


@pytest.mark.parametrize(("sink", "window"), [(0, 1), (2, 3), (4, 8), (5, 2)])
def test_visible_and_ring_slots_match_a_list_model(sink, window):
    n = 3 * (sink + window) + 1
    kpos, p = torch.arange(-1, n)[None, :], torch.arange(n)[:, None]  # -1: an empty slot
    want = [[0 <= j <= q and (j < sink or j > q - window) for j in range(-1, n)] for q in range(n)]
    assert visible(kpos, p, sink, window).tolist() == want
    assert visible(kpos, p, sink, None).tolist() == [[0 <= j <= q for j in range(-1, n)] for q in range(n)]
    ring: dict[int, int] = {}  # slot -> position, filled in order: a sink slot once, ring slots cycling
    for q in range(n):
        slot = q if q < sink else sink + (q - sink) % window
        ring[slot] = q
        assert ring_slots(q, sink, window) == slot
        assert sorted(ring.values()) == [j for j in range(q + 1) if visible(j, q, sink, window)]
    assert ring_slots(torch.arange(n), sink, window).tolist() == [ring_slots(q, sink, window) for q in range(n)]

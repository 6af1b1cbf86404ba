"""KVWindow's device-side decode step (`_attend_step`, what a captured CUDA graph runs) against its host path
(`attend` with one token), on the CPU: the same keys written to the same slots and the same outputs, with SDPA over
kv_step's mask (the default) and with decode_attention reading the ring in place (DELTAMEM_DECODE_ATTENTION=ring),
for a ring that fills, wraps and wraps again, with and without rotary sink queries."""

import pytest
import torch

from deltamem.model.cache import KVWindow, Rotary


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("mode", ["sdpa", "ring"])
@pytest.mark.parametrize("rotary", [False, True])
def test_the_device_step_equals_the_host_step(mode, rotary, monkeypatch):
    monkeypatch.setenv("DELTAMEM_DECODE_ATTENTION", mode)
    hkv, g, d, sink, window = 2, 3, 16, 2, 12
    rot = Rotary(d // 2, 10000.0) if rotary else None
    host, dev = (KVWindow(hkv, d, sink, window, rot, torch.float32, "cpu") for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    prefix = [torch.randn(5, n, d, generator=gen) for n in (hkv * g, hkv, hkv)]
    host.attend(*prefix), dev.attend(*prefix)
    for t in range(5, 40):  # fills at 14, wraps at 26 and 38
        q, k, v = torch.randn(1, hkv * g, d, generator=gen), torch.randn(1, hkv, d, generator=gen), \
            torch.randn(1, hkv, d, generator=gen)  # fmt: skip
        want = host.attend(q, k, v)
        got = dev._attend_step(q, k, v, torch.tensor([t]))
        dev.seen += 1  # the caller's part (model/cuda_graph.py)
        assert rel(got, want) < 1e-5, t
        assert torch.equal(dev.pos, host.pos) and torch.equal(dev.k, host.k) and torch.equal(dev.v, host.v)


@pytest.mark.parametrize("rotary", [False, True])
def test_a_stack_of_rings_reads_each_as_its_own_window(rotary, monkeypatch):
    """KVStack (batched decode) with DELTAMEM_DECODE_ATTENTION=ring against the host step of each window alone."""
    from deltamem.model.cache import KVStack

    monkeypatch.setenv("DELTAMEM_DECODE_ATTENTION", "ring")
    hkv, g, d, sink, window = 2, 2, 16, 2, 10
    rot = Rotary(d // 2, 10000.0) if rotary else None
    gen = torch.Generator().manual_seed(1)
    alone, stacked = [], []
    for n in (3, 11, 25):  # three streams at different points of their rings
        pair = [KVWindow(hkv, d, sink, window, rot, torch.float32, "cpu") for _ in range(2)]
        prefix = [torch.randn(n, m, d, generator=gen) for m in (hkv * g, hkv, hkv)]
        for w in pair:
            w.attend(*prefix)
        alone.append(pair[0])
        stacked.append(pair[1])
    stack = KVStack(stacked[0], 3)
    for row, w in enumerate(stacked):
        stack.put(row, w)
    for _ in range(12):
        q, k, v = (torch.randn(3, m, d, generator=gen) for m in (hkv * g, hkv, hkv))
        stack.p = torch.tensor([w.seen for w in stacked])
        got = stack.attend(q, k, v)
        for w in stacked:
            w.seen += 1
        for i, w in enumerate(alone):
            assert rel(got[i], w.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1])[0]) < 1e-5

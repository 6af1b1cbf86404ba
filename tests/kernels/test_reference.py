"""Reference ops vs an independent plain loop and vs transformers' own torch implementation."""

import pytest
import torch

from deltamem.kernels import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule


def naive(q, k, v, g, beta, s):
    """The gated delta rule written out per token, per batch and head, from its definition."""
    b, t, h, dk = q.shape
    hv = v.shape[2]
    out = torch.zeros(b, t, hv, v.shape[-1], dtype=torch.float64)
    s = s.double().clone()
    for bi in range(b):
        for j in range(hv):
            kh = j // (hv // h)
            for i in range(t):
                qi = q[bi, i, kh].double()
                ki = k[bi, i, kh].double()
                qi, ki = qi / (qi.norm() ** 2 + 1e-6).sqrt(), ki / (ki.norm() ** 2 + 1e-6).sqrt()
                s[bi, j] *= torch.exp(g[bi, i, j].double())
                err = v[bi, i, j].double() - s[bi, j].T @ ki
                s[bi, j] += torch.outer(ki, beta[bi, i, j].double() * err)
                out[bi, i, j] = s[bi, j].T @ (qi * dk**-0.5)
    return out, s


def inputs(b, t, h, hv, dk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, h, dk, generator=gen), torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, hv, dv, generator=gen)
    g = -torch.rand(b, t, hv, generator=gen) * 0.5
    beta = torch.rand(b, t, hv, generator=gen) * 2  # [0, 2]: negative eigenvalues allowed
    s0 = torch.randn(b, hv, dk, dv, generator=gen) * 0.1
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("t", [1, 63, 75, 130])
@pytest.mark.parametrize("op", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_ops_match_naive_loop(op, t):
    q, k, v, g, beta, s0 = inputs(2, t, 2, 4, 12, 20)
    want_o, want_s = naive(q, k, v, g, beta, s0)
    o, s = op(q, k, v, g, beta, initial_state=s0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(o.double(), want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-4, atol=1e-4)


def test_state_passes_across_calls_and_chunk_boundaries():
    q, k, v, g, beta, s0 = inputs(1, 200, 3, 3, 16, 8, seed=1)
    whole_o, whole_s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    s, outs = s0, []
    for a, b in [(0, 37), (37, 38), (38, 101), (101, 200)]:  # splits inside and across 64-token chunks
        op = recurrent_gated_delta_rule if b - a == 1 else chunk_gated_delta_rule
        o, s = op(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state=s)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), whole_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, whole_s, rtol=1e-5, atol=1e-5)


def test_chunk_matches_transformers_reference():
    import transformers.models.olmo_hybrid.modeling_olmo_hybrid as hf

    q, k, v, g, beta, s0 = inputs(2, 150, 2, 4, 16, 24, seed=2)
    want_o, want_s = hf.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    q, k, v, g, beta, _ = inputs(1, 5, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="multiple of key heads"):
        chunk_gated_delta_rule(q, k, v, g, beta)


def test_causal_conv_continues_from_state():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(50, 6, generator=gen), torch.randn(6, 4, generator=gen)
    padded = torch.cat([torch.zeros(3, 6), x])
    want = torch.nn.functional.silu(torch.stack([(padded[t : t + 4].T * w).sum(1) for t in range(50)]))
    y1, st = causal_conv1d(x[:20], w, torch.zeros(3, 6))
    y2, st = causal_conv1d(x[20:21], w, st)
    y3, _ = causal_conv1d(x[21:], w, st)
    torch.testing.assert_close(torch.cat([y1, y2, y3]), want, rtol=1e-6, atol=1e-6)

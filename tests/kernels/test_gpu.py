"""Triton kernels on a CUDA GPU at OLMo Hybrid 7B's DeltaNet shapes, against the torch reference run in fp32 on the GPU.

Skipped without CUDA. Tolerances are relative error norms ||out - ref|| / ||ref||; bf16 inputs are compared with a
reference computed in fp32 from the same (bf16-rounded) inputs, so the error measured is the kernels' own.
"""

import pytest
import torch

from deltamem.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton_ops = (
    pytest.importorskip("deltamem.kernels.triton_ops", reason="needs triton") if torch.cuda.is_available() else None
)

H, HV, DK, DV = 30, 30, 96, 192
BF16_O, BF16_STATE = 1e-2, 5e-3  # bf16 inputs, bf16 intermediates, fp32 state
FP32_O, FP32_STATE = 1e-4, 1e-4  # fp32 inputs: fp32 intermediates, tf32x3 products


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def inputs(t: int, b: int = 1, h: int = H, hv: int = HV, dtype=torch.bfloat16, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    return {
        "q": randn(b, t, h, DK).to(dtype),
        "k": randn(b, t, h, DK).to(dtype),
        "v": randn(b, t, hv, DV).to(dtype),
        "g": torch.nn.functional.logsigmoid(randn(b, t, hv) + 2.0),
        "beta": (torch.sigmoid(randn(b, t, hv)) * 2).to(dtype),  # [0, 2]: negative eigenvalues allowed
        "initial_state": randn(b, hv, DK, DV) * 0.1,
    }


def fp32(x: dict) -> dict:
    return {k: v.float() for k, v in x.items()}


@pytest.mark.parametrize("t", [2048, 4100, 8192])
def test_chunk_bf16_7b(t):
    x = inputs(t, seed=t)
    o, s = triton_ops.chunk_gated_delta_rule(**x)
    ro, rs = reference.chunk_gated_delta_rule(**fp32(x))
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    err_o, err_s = rel(o, ro), rel(s, rs)
    print(f"T={t}: rel err o {err_o:.2e}, state {err_s:.2e}")
    assert err_o < BF16_O and err_s < BF16_STATE


def test_chunk_fp32_7b():
    x = inputs(1000, dtype=torch.float32, seed=1)
    o, s = triton_ops.chunk_gated_delta_rule(**x)
    ro, rs = reference.chunk_gated_delta_rule(**x)
    assert rel(o, ro) < FP32_O and rel(s, rs) < FP32_STATE


def test_chunk_gva_batch2():
    x = inputs(300, b=2, h=H // 2, seed=2)
    o, s = triton_ops.chunk_gated_delta_rule(**x)
    ro, rs = reference.chunk_gated_delta_rule(**fp32(x))
    assert rel(o, ro) < BF16_O and rel(s, rs) < BF16_STATE


def test_chunk_state_carried_across_calls():
    x = inputs(8192, seed=3)
    o, s = triton_ops.chunk_gated_delta_rule(**x)
    cut = 3001
    first = {k: v[:, :cut] if k != "initial_state" else v for k, v in x.items()}
    o1, s1 = triton_ops.chunk_gated_delta_rule(**first)
    second = {k: v[:, cut:] if k != "initial_state" else s1 for k, v in x.items()}
    o2, s2 = triton_ops.chunk_gated_delta_rule(**second)
    # the split changes chunk boundaries, so the two runs round differently: compare at bf16 tolerance
    assert rel(torch.cat([o1, o2], 1), o) < BF16_O and rel(s2, s) < BF16_STATE


def test_varlen_matches_separate_runs():
    lens = [1000, 4100, 37, 3055]
    x = inputs(sum(lens), seed=4)
    x["initial_state"] = torch.randn(len(lens), HV, DK, DV, device="cuda") * 0.1
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    o, s = triton_ops.chunk_gated_delta_rule(**x, cu_seqlens=cu)
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        part = {k: v[:, a:b] if k != "initial_state" else v[i : i + 1] for k, v in x.items()}
        po, ps = triton_ops.chunk_gated_delta_rule(**part)
        # same chunks and arithmetic; only the autotuned V blocking may differ between the two launches
        assert rel(o[:, a:b], po) < 1e-3 and rel(s[i : i + 1], ps) < 1e-4
    ro, rs = reference.chunk_gated_delta_rule(**fp32(x), cu_seqlens=cu)
    assert rel(o, ro) < BF16_O and rel(s, rs) < BF16_STATE


@pytest.mark.parametrize("t", [1, 4])
def test_recurrent_step_7b(t):
    x = inputs(t, seed=5)
    o, s = triton_ops.recurrent_gated_delta_rule(**x)
    ro, rs = reference.recurrent_gated_delta_rule(**fp32(x))
    assert rel(o, ro) < 5e-3 and rel(s, rs) < 1e-5  # o: bf16 output rounding; state: fp32 throughout
    state = x["initial_state"].clone()
    oi, si = triton_ops.recurrent_gated_delta_rule(**{**x, "initial_state": state}, inplace=True)
    assert si.data_ptr() == state.data_ptr()
    torch.testing.assert_close(oi, o, rtol=0, atol=0)
    torch.testing.assert_close(si, s, rtol=0, atol=0)


@pytest.mark.parametrize("t", [1, 4100])
def test_conv_7b(t):
    c = 2 * H * DK + HV * DV
    gen = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, c, generator=gen, device="cuda").bfloat16()
    w = torch.randn(c, 4, generator=gen, device="cuda").bfloat16()
    st = torch.randn(3, c, generator=gen, device="cuda").bfloat16()
    y, ns = triton_ops.causal_conv1d(x, w, st)
    ry, rns = reference.causal_conv1d(x.float(), w.float(), st.float())
    assert rel(y, ry) < 5e-3
    torch.testing.assert_close(ns, rns.bfloat16(), rtol=0, atol=0)


def test_gated_norm_7b():
    gen = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(4100 * HV, DV, generator=gen, device="cuda").bfloat16()
    gate = torch.randn(4100 * HV, DV, generator=gen, device="cuda").bfloat16()
    w = torch.rand(DV, generator=gen, device="cuda") + 0.5
    y = triton_ops.gated_rms_norm(x, gate, w, 1e-5)
    assert rel(y, reference.gated_rms_norm(x, gate, w, 1e-5)) < 5e-3


@pytest.mark.parametrize("t", [1, 300])
def test_fused_norms_and_gates_7b(t):
    """Residual add + RMSNorm at hidden 3840 and the DeltaNet gates at 30 heads, bf16, against torch's own ops."""
    gen = torch.Generator(device="cuda").manual_seed(t)
    x, y = (torch.randn(t, 3840, generator=gen, device="cuda").bfloat16() for _ in range(2))
    w = (torch.rand(3840, generator=gen, device="cuda") + 0.5).bfloat16()

    def ref_norm(z):
        return torch.nn.functional.rms_norm(z, (3840,), w, 1e-6)

    s, n = triton_ops.add_rms_norm(x, y, w, 1e-6)
    assert torch.equal(s, x + y)  # rounded to nearest exactly as torch's bf16 add
    assert rel(n, ref_norm(x + y)) < 4e-3 and rel(triton_ops.rms_norm(x, w, 1e-6), ref_norm(x)) < 4e-3
    assert rel(triton_ops.rms_norm_add(x, y, w, 1e-6), x + ref_norm(y)) < 4e-3
    a, b = (torch.randn(t, 30, generator=gen, device="cuda").bfloat16() * 4 for _ in range(2))
    a_log, dt_bias = torch.rand(30, device="cuda").log1p(), torch.randn(30, device="cuda")
    g, beta = triton_ops.delta_gates(a, b, a_log, dt_bias, 2.0)
    rg, rbeta = reference.delta_gates(a, b, a_log, dt_bias, 2.0)
    assert rel(g, rg) < 1e-5 and rel(beta, rbeta) < 4e-3


@pytest.mark.parametrize("t", [1, 300, 70_000])  # 70k rows: more than a grid's second axis may hold
def test_silu_mul_7b(t):
    """The MLP activation on slices of the fused [gate | up] output (intermediate 11008), bf16, against torch."""
    gen = torch.Generator(device="cuda").manual_seed(t)
    fused = torch.randn(t, 2 * 11008 + 64, generator=gen, device="cuda").bfloat16() * 3
    gate, up = fused[:, :11008], fused[:, 11008:22016]
    want = torch.nn.functional.silu(gate) * up
    got = triton_ops.silu_mul(gate, up)
    assert rel(got, want) < 4e-3 and (got != want).float().mean() < 0.01  # nearly all bits equal


def test_kv_step_7b():
    """A decode token into a 4 + 4096 ring at 30 heads x 128, bf16: same cache and mask as the reference's."""
    hkv, cap, d = 30, 4100, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    k0 = torch.randn(hkv, cap, d, generator=gen, device="cuda").bfloat16()
    v0 = torch.randn(hkv, cap, d, generator=gen, device="cuda").bfloat16()
    for p in (2, 3000, 4100, 9999):  # a sink slot, a ring slot before and after the ring is full
        seen = torch.arange(p, device="cuda")
        held = seen[(seen < 4) | (seen >= p - 4096)]
        pos0 = torch.full((cap,), -1, device="cuda")
        pos0[torch.where(held < 4, held, 4 + (held - 4) % 4096)] = held
        k, v = (torch.randn(hkv, d, generator=gen, device="cuda").bfloat16() for _ in range(2))
        out = []
        for impl in (triton_ops, reference):
            kc, vc, pos = k0.clone(), v0.clone(), pos0.clone()
            mask = impl.kv_step(kc, vc, pos, k, v, torch.tensor([p], device="cuda"), 4, 4096)
            out.append((kc, vc, pos, mask))
        for a, b in zip(*out, strict=True):
            assert torch.equal(a, b)


def test_dispatcher_picks_triton_on_cuda(monkeypatch):
    from deltamem import kernels

    monkeypatch.setenv("DELTAMEM_KERNELS", "auto")
    x = inputs(100, seed=7)
    assert kernels.backend(x["q"]) == "triton"
    o, s = kernels.chunk_gated_delta_rule(**x)
    to, ts = triton_ops.chunk_gated_delta_rule(**x)
    torch.testing.assert_close(o, to, rtol=0, atol=0)
    monkeypatch.setenv("DELTAMEM_KERNELS", "torch")
    assert kernels.backend(x["q"]) == "torch"


def test_training_norms_in_bf16_with_float32_master_weights():
    """The norms as training runs them on a GPU (autograd on, bf16 activations, float32 trained weights): the
    fused rms_norm in bf16, against the plain float32 formula; gradients reach the float32 weight."""
    from deltamem.model.layers import GatedRMSNorm, RMSNorm

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 256, 576, generator=gen, device="cuda").bfloat16()
    gate = torch.randn(4, 256, 576, generator=gen, device="cuda").bfloat16()
    for norm, args in ((RMSNorm(576, 1e-5), (x,)), (GatedRMSNorm(576), (x, gate))):
        norm = norm.cuda()
        with torch.no_grad():
            norm.weight.copy_(torch.rand(576, generator=gen, device="cuda") + 0.5)
        out = norm(*args)
        xf = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
        want = xf * torch.nn.functional.silu(gate.float()) if len(args) == 2 else xf
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=2e-2)
        out.float().sum().backward()
        assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_training_banded_attention_bf16_at_the_distillation_shape():
    """The student's training attention (sink + window by blocks of `window` queries) as the distillation runs it:
    bf16 on the GPU, SmolLM2's 9 heads of doubled width 128, T = 4 x window + a ragged tail; against the dense
    [T, T] mask computed in float32 from the same inputs, outputs and gradients."""
    from deltamem.model.train import _banded_attention

    t, sink, window = 4096 + 100, 4, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 9, t, 128, generator=gen, device="cuda").bfloat16().requires_grad_() for _ in range(3))
    up = torch.randn(2, 9, t, 128, generator=gen, device="cuda")
    pos = torch.arange(t, device="cuda")
    j, p = pos[None, :], pos[:, None]
    dense = (j <= p) & ((j > p - window) | (j < sink))
    out = _banded_attention(q, k, v, sink, window, 128**-0.5)
    grads = torch.autograd.grad((out.float() * up).sum(), (q, k, v))
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=dense, scale=128**-0.5)
    wgrads = torch.autograd.grad((want * up).sum(), (qf, kf, vf))
    assert out.dtype == torch.bfloat16
    assert rel(out, want) < BF16_O
    for g, w in zip(grads, wgrads, strict=True):
        assert rel(g, w) < 2 * BF16_O

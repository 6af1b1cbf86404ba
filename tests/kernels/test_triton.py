"""Triton kernels (kernels/chunk.py, recurrent.py, conv.py, norm.py, gates.py, kv_ring.py) run by the Triton
interpreter on CPU, against the torch reference and a float64 per-token loop.

Triton reads TRITON_INTERPRET when it is imported, when a kernel is decorated and while kernels run. This module
imports triton with it set, loads its own copy of the Triton modules (kernels.triton_ops and what it imports; the
package's own modules are untouched), unsets it again, and sets it back only while its own tests run. If triton was
already imported for compiling (the GPU tests ran first in this process), the module is skipped. Tolerances are
relative error norms ||out - ref|| / ||ref||.
"""

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from deltamem import kernels  # noqa: E402
from deltamem.kernels import reference  # noqa: E402
from tests.kernels.test_reference import inputs, naive  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _interpret():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


# The modules of kernels/ that import triton: fresh copies of all of them are loaded under the interpreter.
TRITON_MODULES = ("triton_util", "chunk", "recurrent", "conv", "norm", "gates", "kv_ring", "attn_decode", "triton_ops")


def _fresh_import(name: str, fresh: list[str]):
    """A new copy of module `name`, the modules in `fresh` imported anew for it; sys.modules and the package's
    attributes are left as they were."""
    pkg = sys.modules["deltamem.kernels"]
    saved = {n: sys.modules.pop(n) for n in fresh if n in sys.modules}
    attrs = {n.rsplit(".", 1)[1]: pkg.__dict__.get(n.rsplit(".", 1)[1]) for n in fresh}
    try:
        return importlib.import_module(name)
    finally:
        for n in fresh:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        for attr, value in attrs.items():
            if value is None:
                pkg.__dict__.pop(attr, None)
            else:
                setattr(pkg, attr, value)


def test_every_triton_module_is_loaded_interpreted():
    imports_triton = {p.stem for p in (ROOT / "kernels").glob("*.py") if "\nimport triton\n" in p.read_text()}
    assert imports_triton == set(TRITON_MODULES) - {"triton_ops"}


def _interpreted_copy():
    with _interpret():
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(std.cdiv, InterpretedFunction):
            pytest.skip(
                "triton was imported without TRITON_INTERPRET=1 earlier in this process (the GPU tests?): "
                "run tests/kernels/test_triton.py in a process of its own",
                allow_module_level=True,
            )
        mod = _fresh_import("deltamem.kernels.triton_ops", [f"deltamem.kernels.{m}" for m in TRITON_MODULES])
    assert mod.INTERPRET
    return mod


tg = _interpreted_copy()


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on():
    with _interpret():
        yield


FP32 = 2e-5  # fp32 inputs: the interpreter multiplies in fp32 (numpy)
# bf16 inputs: intermediates are stored in bf16, and the interpreter's fp32 -> bf16 cast truncates (a GPU rounds to
# nearest), about doubling the error measured on a GPU (o 4e-3, state 3e-3 at 7B shapes, tests/kernels/test_gpu.py).
BF16_O, BF16_STATE = 3e-2, 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty and torch.empty_like filled with NaN: an output element a kernel never writes stays NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


@pytest.mark.parametrize("t", [1, 63, 64, 100, 130])
def test_chunk_matches_naive_and_reference(t, poisoned):
    q, k, v, g, beta, s0 = inputs(2, t, 2, 4, 24, 40, seed=t)  # batch 2, GVA (HV = 2H), K and V not powers of 2
    want_o, want_s = naive(q, k, v, g, beta, s0)
    o, s = tg.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert o.shape == v.shape and o.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(o, want_o) < FP32 and rel(s, want_s) < FP32
    ro, rs = reference.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert rel(o, ro) < FP32 and rel(s, rs) < FP32


@pytest.mark.parametrize("t", [1, 5])
def test_recurrent_matches_naive_and_reference(t, poisoned):
    q, k, v, g, beta, s0 = inputs(2, t, 2, 4, 24, 40, seed=10 + t)
    want_o, want_s = naive(q, k, v, g, beta, s0)
    o, s = tg.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert rel(o, want_o) < FP32 and rel(s, want_s) < FP32
    ro, rs = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert rel(o, ro) < FP32 and rel(s, rs) < FP32


def test_recurrent_in_place_and_without_state(poisoned):
    q, k, v, g, beta, s0 = inputs(1, 3, 2, 2, 16, 32, seed=20)
    o, s = tg.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    state = s0.clone()
    oi, si = tg.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, inplace=True)
    assert si is state
    torch.testing.assert_close(oi, o, rtol=0, atol=0)
    torch.testing.assert_close(state, s, rtol=0, atol=0)
    assert not torch.equal(state, s0)
    o0, s0_out = tg.recurrent_gated_delta_rule(q, k, v, g, beta)  # no initial state: zeros
    ro, rs = reference.recurrent_gated_delta_rule(q, k, v, g, beta)
    assert rel(o0, ro) < FP32 and rel(s0_out, rs) < FP32


def test_state_carried_across_calls(poisoned):
    q, k, v, g, beta, s0 = inputs(1, 150, 2, 2, 48, 32, seed=2)
    whole_o, whole_s = tg.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    s, outs = s0, []
    for a, b in [(0, 37), (37, 38), (38, 150)]:  # an odd split, a decode step, then a chunk crossing 64-boundaries
        op = tg.recurrent_gated_delta_rule if b - a == 1 else tg.chunk_gated_delta_rule
        o, s = op(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state=s)
        outs.append(o)
    assert rel(torch.cat(outs, 1), whole_o) < FP32 and rel(s, whole_s) < FP32


@pytest.mark.parametrize("dk", [96, 128])
def test_chunk_at_the_7b_key_width(dk, poisoned):
    """K = 96 (OLMo Hybrid 7B's, padded to 128 in the kernels' tiles) and 128, with and without an initial state."""
    q, k, v, g, beta, s0 = inputs(1, 130, 1, 2, dk, 24, seed=dk)
    want_o, want_s = naive(q, k, v, g, beta, s0)
    o, s = tg.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert rel(o, want_o) < FP32 and rel(s, want_s) < FP32
    o, s = tg.chunk_gated_delta_rule(q, k, v, g, beta)  # no initial state
    want_o, want_s = naive(q, k, v, g, beta, torch.zeros_like(s0))
    assert rel(o, want_o) < FP32 and rel(s, want_s) < FP32


def test_varlen_matches_separate_runs(poisoned):
    lens = [37, 64, 90]
    q, k, v, g, beta, _ = inputs(1, sum(lens), 2, 4, 24, 32, seed=3)
    s0 = torch.randn(len(lens), 4, 24, 32) * 0.1
    cu = torch.tensor([0, 37, 101, 191], dtype=torch.int32)
    o, s = tg.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu)
    assert o.shape == v.shape and s.shape == s0.shape
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        args = (q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b])
        want_o, want_s = naive(*args, s0[i : i + 1])
        assert rel(o[:, a:b], want_o) < FP32 and rel(s[i : i + 1], want_s) < FP32
        po, ps = tg.chunk_gated_delta_rule(*args, initial_state=s0[i : i + 1])
        assert rel(o[:, a:b], po) < 1e-6 and rel(s[i : i + 1], ps) < 1e-6
    ro, rs = reference.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu)
    assert rel(o, ro) < FP32 and rel(s, rs) < FP32


def test_varlen_with_an_empty_sequence_and_no_initial_state():
    q, k, v, g, beta, _ = inputs(1, 70, 1, 1, 16, 16, seed=4)
    cu = torch.tensor([0, 0, 70, 70], dtype=torch.int32)  # empty first (at token 0) and last
    o, s = tg.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)
    ro, rs = reference.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)
    assert rel(o, ro) < FP32 and rel(s, rs) < FP32
    assert torch.equal(s[0], torch.zeros_like(s[0])) and torch.equal(s[2], torch.zeros_like(s[2]))


def test_bf16_inputs(poisoned):
    q, k, v, g, beta, s0 = inputs(1, 100, 2, 2, 48, 32, seed=5)
    q, k, v, beta = (x.bfloat16() for x in (q, k, v, beta))
    o, s = tg.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ro, rs = reference.chunk_gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), initial_state=s0)
    assert rel(o, ro) < BF16_O and rel(s, rs) < BF16_STATE
    o1, s1 = tg.recurrent_gated_delta_rule(q[:, :2], k[:, :2], v[:, :2], g[:, :2], beta[:, :2], initial_state=s0)
    r1, rs1 = reference.recurrent_gated_delta_rule(*(x[:, :2].float() for x in (q, k, v, g, beta)), initial_state=s0)
    assert rel(o1, r1) < 1e-2 and rel(s1, rs1) < FP32  # output rounded to bf16 (truncated here); state fp32


def test_shapes_are_checked():
    q, k, v, g, beta, _ = inputs(1, 5, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="multiple of key heads"):
        tg.chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta, _ = inputs(2, 5, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="batch size 1"):
        tg.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv_matches_reference_and_continues(dtype, poisoned):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 70, 40, generator=gen).to(dtype)
    w = torch.randn(40, 4, generator=gen).to(dtype)
    s0 = torch.randn(2, 3, 40, generator=gen).to(dtype)
    y, st = tg.causal_conv1d(x, w, s0)  # batched
    for b in range(2):
        ry, rst = reference.causal_conv1d(x[b].float(), w.float(), s0[b].float())
        assert rel(y[b], ry) < (1e-6 if dtype == torch.float32 else 1e-2)
        torch.testing.assert_close(st[b], rst.to(dtype), rtol=0, atol=0)
    parts, s = [], s0[0]
    for a, b in [(0, 1), (1, 2), (2, 69), (69, 70)]:  # decode steps and a prefill, state carried
        yp, s = tg.causal_conv1d(x[0, a:b], w, s)
        parts.append(yp)
    torch.testing.assert_close(torch.cat(parts), y[0], rtol=0, atol=0)
    torch.testing.assert_close(s, st[0], rtol=0, atol=0)


@pytest.mark.parametrize("d", [24, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm(d, dtype, poisoned):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(3, 7, d, generator=gen).to(dtype)
    gate = torch.randn(3, 7, d, generator=gen).to(dtype)
    w = torch.rand(d, generator=gen) + 0.5
    y = tg.gated_rms_norm(x, gate, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel(y, reference.gated_rms_norm(x, gate, w, 1e-5)) < (1e-6 if dtype == torch.float32 else 1e-2)
    xf = x.double()
    want = (
        w.double() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.nn.functional.silu(gate.double())
    )
    assert rel(y, want) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("d", [24, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_residual_adds(d, dtype, poisoned):
    """The three fused forms against float64 formulas: norm(x), (x + y, norm(x + y)), x + norm(y)."""
    gen = torch.Generator().manual_seed(d)
    x, y = (torch.randn(5, 3, d, generator=gen).to(dtype) for _ in range(2))
    w = torch.rand(d, generator=gen) + 0.5

    def norm64(z):
        z = z.double()
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    tol = 1e-6 if dtype == torch.float32 else 1e-2
    n = tg.rms_norm(x, w, 1e-5)
    assert n.dtype == dtype and rel(n, norm64(x)) < tol
    s, ns = tg.add_rms_norm(x, y, w, 1e-5)
    assert rel(s, x + y) < (1e-7 if dtype == torch.float32 else 1e-2)  # interpreter: bf16 casts truncate
    assert rel(ns, norm64(s)) < tol
    out = tg.rms_norm_add(x, y, w, 1e-5)
    assert rel(out, x.double() + norm64(y)) < tol
    for got, want in [(n, reference.rms_norm(x, w, 1e-5)), (ns, reference.add_rms_norm(x, y, w, 1e-5)[1]),
                      (out, reference.rms_norm_add(x, y, w, 1e-5))]:  # fmt: skip
        assert rel(got, want) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_gates(dtype, poisoned):
    gen = torch.Generator().manual_seed(3)
    a = (torch.randn(9, 6, generator=gen) * 12).to(dtype)  # reaches softplus's linear branch (> 20)
    b = torch.randn(9, 6, generator=gen).to(dtype)
    a_log, dt_bias = torch.rand(6, generator=gen).log1p() * 2, torch.randn(6, generator=gen)
    g, beta = tg.delta_gates(a, b, a_log, dt_bias, 2.0)
    assert g.dtype == torch.float32 and beta.dtype == dtype
    a64 = a.double() + dt_bias.double()
    want_g = -a_log.double().exp() * torch.where(a64 > 20, a64, torch.log1p(a64.exp()))
    assert rel(g, want_g) < 1e-6
    assert rel(beta, b.double().sigmoid() * 2) < (1e-6 if dtype == torch.float32 else 1e-2)
    rg, rbeta = reference.delta_gates(a, b, a_log, dt_bias, 2.0)
    assert rel(g, rg) < 1e-6 and rel(beta, rbeta) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_on_slices_of_a_fused_output(dtype, poisoned):
    gen = torch.Generator().manual_seed(4)
    fused = (torch.randn(5, 2 * 40 + 8, generator=gen) * 3).to(dtype)  # [gate | up | padding] rows, as the GPU MLP
    gate, up = fused[:, :40], fused[:, 40:80]
    y = tg.silu_mul(gate, up)
    assert y.shape == (5, 40) and y.dtype == dtype
    want = torch.nn.functional.silu(gate.double()) * up.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(y, want) < tol and rel(y, reference.silu_mul(gate, up)) < tol
    with pytest.raises(ValueError, match="silu_mul"):
        tg.silu_mul(gate, up[:, :39])


def test_kv_step_against_a_list_model_of_the_ring(poisoned):
    """Decode 30 tokens into a 2-sink + 8-slot ring: after each, the cache rows, the positions and the mask
    equal what a plain Python list model of StreamingLLM's ring says, for the kernel and the reference."""
    sink, window, hkv, d = 2, 8, 3, 5
    gen = torch.Generator().manual_seed(8)
    caches = {
        impl: (torch.zeros(hkv, sink + window, d), torch.zeros(hkv, sink + window, d), torch.full((10,), -1))
        for impl in (tg, reference)
    }
    held: dict[int, int] = {}  # slot -> position
    for p in range(30):
        k, v = torch.randn(hkv, d, generator=gen), torch.randn(hkv, d, generator=gen)
        slot = p if p < sink else sink + (p - sink) % window
        held[slot] = p
        allowed = {s for s, q in held.items() if q < sink or q > p - window}
        for impl, (kc, vc, pos) in caches.items():
            mask = impl.kv_step(kc, vc, pos, k, v, torch.tensor([p]), sink, window)
            assert mask.shape == (sink + window,) and mask.dtype == kc.dtype
            assert {s for s in range(sink + window) if mask[s] == 0} == allowed
            assert all(mask[s] == float("-inf") for s in range(sink + window) if s not in allowed)
            assert torch.equal(kc[:, slot], k) and torch.equal(vc[:, slot], v)
            assert pos.tolist() == [held.get(s, -1) for s in range(sink + window)]
    assert torch.equal(caches[tg][0], caches[reference][0]) and torch.equal(caches[tg][1], caches[reference][1])


def test_conv_and_recurrent_in_place(poisoned, monkeypatch):
    gen = torch.Generator().manual_seed(9)
    x, w, s0 = torch.randn(3, 16, generator=gen), torch.randn(16, 4, generator=gen), torch.randn(3, 16, generator=gen)
    want_y, want_s = reference.causal_conv1d(x, w, s0)
    for t in (1, 3):  # a decode step, and more tokens than the state holds rows
        s = s0.clone()
        y, ns = tg.causal_conv1d(x[:t], w, s, inplace=True)
        ry, rs = reference.causal_conv1d(x[:t], w, s0)
        assert ns is s and torch.equal(s, rs) and rel(y, ry) < 1e-6
    q, k, v, g, beta, h0 = inputs(1, 1, 2, 2, 16, 16, seed=10)
    want_o, want_h = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    for mode in ("torch", "triton"):  # the dispatcher: Triton in place, or the reference then a copy
        monkeypatch.setenv("DELTAMEM_KERNELS", mode)
        monkeypatch.setattr(kernels, "_triton_module", tg)
        h = h0.clone()
        o, out = kernels.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h, inplace=True)
        assert out is h and rel(h, want_h) < FP32 and rel(o, want_o) < FP32
        s = s0.clone()
        y, ns = kernels.causal_conv1d(x, w, s, inplace=True)
        assert ns is s and rel(s, want_s) < 1e-6 and rel(y, want_y) < 1e-6


# ---- dispatcher ----


def test_dispatcher_modes(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("DELTAMEM_KERNELS", raising=False)
    assert kernels.backend(x) == "torch"  # auto on CPU
    monkeypatch.setenv("DELTAMEM_KERNELS", "torch")
    assert kernels.backend(x) == "torch"
    monkeypatch.setenv("DELTAMEM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DELTAMEM_KERNELS"):
        kernels.backend(x)
    monkeypatch.setenv("DELTAMEM_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.chunk_gated_delta_rule(*inputs(1, 3, 1, 1, 16, 16)[:5])


def test_dispatcher_runs_triton_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("DELTAMEM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_triton_module", tg)
    q, k, v, g, beta, s0 = inputs(1, 70, 2, 2, 16, 16, seed=7)
    o, s = kernels.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    ro, rs = reference.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert rel(o, ro) < FP32 and rel(s, rs) < FP32
    o1, s1 = kernels.recurrent_gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], None, s0)
    ro1, rs1 = reference.recurrent_gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], None, s0)
    assert rel(o1, ro1) < FP32 and rel(s1, rs1) < FP32
    x, w, st = torch.randn(5, 8), torch.randn(8, 4), torch.randn(3, 8)
    y, ns = kernels.causal_conv1d(x, w, st)
    ry, rns = reference.causal_conv1d(x, w, st)
    assert rel(y, ry) < 1e-6 and torch.equal(ns, rns)
    gate, nw = torch.randn(5, 8), torch.rand(8)
    assert rel(kernels.gated_rms_norm(x, gate, nw), reference.gated_rms_norm(x, gate, nw)) < 1e-6


def test_reference_varlen_matches_separate_runs():
    q, k, v, g, beta, _ = inputs(1, 50, 1, 2, 8, 8, seed=8)
    s0 = torch.randn(2, 2, 8, 8)
    o, s = kernels.chunk_gated_delta_rule(q, k, v, g, beta, None, s0, cu_seqlens=torch.tensor([0, 20, 50]))
    for i, (a, b) in enumerate([(0, 20), (20, 50)]):
        po, ps = reference.chunk_gated_delta_rule(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state=s0[i : i + 1]
        )
        torch.testing.assert_close(o[:, a:b], po)
        torch.testing.assert_close(s[i : i + 1], ps)


def test_import_does_not_load_triton_on_cpu():
    code = (
        "import sys, torch\nfrom deltamem import kernels\n"
        "x = torch.randn(1, 3, 1, 16)\n"
        "kernels.chunk_gated_delta_rule(x, x, x, torch.zeros(1, 3, 1), torch.ones(1, 3, 1))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DELTAMEM_KERNELS", "TRITON_INTERPRET")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _ring(hkv, d, sink, window, upto, seed, dtype=torch.float32):
    """A ring that has taken tokens 0..upto (kv_step, the reference), padded with empty slots past sink + window."""
    n = sink + window + 7  # buffers longer than the ring, as KVWindow's aligned ones: the tail stays empty
    kc, vc = torch.zeros(hkv, n, d, dtype=dtype), torch.zeros(hkv, n, d, dtype=dtype)
    pos = torch.full((n,), -1)
    gen = torch.Generator().manual_seed(seed)
    for t in range(upto + 1):
        k, v = torch.randn(hkv, d, generator=gen).to(dtype), torch.randn(hkv, d, generator=gen).to(dtype)
        reference.kv_step(kc[:, : sink + window], vc[:, : sink + window], pos[: sink + window], k, v,
                          torch.tensor([t]), sink, window)  # fmt: skip
    return kc, vc, pos


def _naive_decode(q, kc, vc, pos, p, sink, window, scale, q_sink=None, gate=None):
    """float64, slot by slot, head by head: the window rule written out, no masks or batched matmuls."""
    h, d = q.shape
    g = h // kc.shape[0]
    out = torch.zeros(h, d, dtype=torch.float64)
    for i in range(h):
        scores, rows = [], []
        for s in range(kc.shape[1]):
            kp = int(pos[s])
            if kp < 0 or kp > p or not (kp < sink or kp > p - window):
                continue
            qi = q_sink[i] if q_sink is not None and s < sink else q[i]
            scores.append(float(qi.double() @ kc[i // g, s].double()) * scale)
            rows.append(vc[i // g, s].double())
        w = torch.tensor(scores, dtype=torch.float64).softmax(0)
        out[i] = sum(wi * r for wi, r in zip(w, rows, strict=True))
        if gate is not None:
            out[i] *= torch.sigmoid(gate[i].double())
    return out


@pytest.mark.parametrize("p", [0, 3, 40, 101, 257])  # sinks only, filling, just full, wrapped, wrapped twice
def test_decode_attention_reads_the_ring_as_the_window_rule_says(p, poisoned):
    hkv, g, d, sink, window = 2, 3, 24, 2, 100  # a group of 3 and a head width of 24: padded blocks
    kc, vc, pos = _ring(hkv, d, sink, window, p, seed=p)
    gen = torch.Generator().manual_seed(100 + p)
    q, q_sink, gate = (torch.randn(hkv * g, d, generator=gen) for _ in range(3))
    pt, scale = torch.tensor([p]), d**-0.5
    for extra in ({}, {"q_sink": q_sink}, {"gate": gate}, {"q_sink": q_sink, "gate": gate}):
        want = _naive_decode(q, kc, vc, pos, p, sink, window, scale, **extra)
        ref = reference.decode_attention(q, kc, vc, pos, pt, sink, window, scale, **extra)
        out = tg.decode_attention(q, kc, vc, pos, pt, sink, window, scale, **extra)
        assert rel(ref, want) < 1e-6 and rel(out, want) < FP32, extra
    stale = pos.clone()  # a slot holding a position the window has passed (a ring never keeps one) stays unseen
    stale[sink + 5] = max(p - window, -1)
    assert rel(tg.decode_attention(q, kc, vc, stale, pt, sink, window, scale),
               _naive_decode(q, kc, vc, stale, p, sink, window, scale)) < FP32  # fmt: skip
    # and what the model's decode step computes today: SDPA with the mask kv_step returns
    mask = torch.where(kernels.window.visible(pos, pt, sink, window), 0.0, float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.view(hkv * g, 1, d)[None], kc[None], vc[None], attn_mask=mask[None], scale=scale, enable_gqa=True
    )[0, :, 0]
    assert rel(tg.decode_attention(q, kc, vc, pos, pt, sink, window, scale), sdpa) < FP32


def test_decode_attention_bf16_and_bit_identical_across_calls(poisoned):
    hkv, g, d, sink, window, p = 2, 4, 32, 4, 200, 333
    kc, vc, pos = _ring(hkv, d, sink, window, p, seed=1, dtype=torch.bfloat16)
    q = torch.randn(hkv * g, d, generator=torch.Generator().manual_seed(2)).bfloat16()
    pt = torch.tensor([p])
    outs = [tg.decode_attention(q, kc, vc, pos, pt, sink, window, d**-0.5) for _ in range(3)]
    assert outs[0].dtype == torch.bfloat16 and all(torch.equal(o, outs[0]) for o in outs)
    assert rel(outs[0], _naive_decode(q, kc, vc, pos, p, sink, window, d**-0.5)) < BF16_O


def test_decode_attention_refuses_what_it_cannot_read():
    kc, vc, pos = _ring(2, 16, 2, 8, 3, seed=0)
    q = torch.randn(6, 16)
    with pytest.raises(ValueError, match="decode_attention"):
        tg.decode_attention(q[:5], kc, vc, pos, torch.tensor([3]), 2, 8, 0.25)  # 5 heads over 2 kv heads
    with pytest.raises(ValueError, match="gate"):
        tg.decode_attention(q, kc, vc, pos, torch.tensor([3]), 2, 8, 0.25, gate=q[:, :8])
    with pytest.raises(ValueError, match="contiguous"):
        tg.decode_attention(q, kc.transpose(1, 2).contiguous().transpose(1, 2), vc, pos, torch.tensor([3]), 2, 8, 0.25)


def test_decode_attention_batched_each_stream_on_its_own_ring(poisoned):
    hkv, g, d, sink, window = 2, 2, 16, 2, 30
    rings = [_ring(hkv, d, sink, window, p, seed=p) for p in (0, 17, 45, 95)]  # sinks only .. wrapped twice
    kc, vc, pos = (torch.stack(x) for x in zip(*rings, strict=True))
    pt = torch.tensor([0, 17, 45, 95])
    gen = torch.Generator().manual_seed(5)
    q, q_sink, gate = (torch.randn(4, hkv * g, d, generator=gen) for _ in range(3))
    out = tg.decode_attention(q, kc, vc, pos, pt, sink, window, d**-0.5, q_sink=q_sink, gate=gate)
    for i, p in enumerate(pt.tolist()):
        want = _naive_decode(q[i], kc[i], vc[i], pos[i], p, sink, window, d**-0.5, q_sink[i], gate[i])
        assert rel(out[i], want) < FP32, p
    ref = reference.decode_attention(q, kc, vc, pos, pt, sink, window, d**-0.5, q_sink=q_sink, gate=gate)
    assert rel(ref, out) < FP32
    with pytest.raises(ValueError, match="decode_attention"):
        tg.decode_attention(q, kc, vc, pos, pt[:3], sink, window, d**-0.5)  # a position for every stream


@pytest.mark.parametrize("programs", [16, None])  # 9 splits of 2 blocks each (single); the default: 1 block a split
def test_decode_attention_over_a_long_ring_several_blocks_a_split(programs, poisoned, monkeypatch):
    """A window of 1,100 slots (18 blocks): splits of several blocks, so a split's online softmax rescales what it
    has, and the combine meets splits of real weight; single and batched."""
    import deltamem.kernels.attn_decode as ad

    if programs:
        monkeypatch.setattr(ad, "PROGRAMS", programs)
    hkv, g, d, sink, window = 1, 2, 16, 4, 1100
    rings = [_ring(hkv, d, sink, window, p, seed=p) for p in (700, 2500)]
    kc, vc, pos = (torch.stack(x) for x in zip(*rings, strict=True))
    vc[:, :, -1] = float("nan")  # an unused slot holding garbage is never read
    pt = torch.tensor([700, 2500])
    q = torch.randn(2, hkv * g, d, generator=torch.Generator().manual_seed(3))
    out = tg.decode_attention(q, kc, vc, pos, pt, sink, window, d**-0.5)
    for i, p in enumerate(pt.tolist()):
        want = _naive_decode(q[i], kc[i], vc[i], pos[i], p, sink, window, d**-0.5)
        assert rel(out[i], want) < FP32 and rel(tg.decode_attention(q[i], kc[i], vc[i], pos[i], pt[i : i + 1], sink,
                                                                    window, d**-0.5), want) < FP32  # fmt: skip

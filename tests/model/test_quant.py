"""Weight-only quantization on the CPU (--quant f16 / int8 / int4, model/packed.py): each quantized linear stays
within the error its quantization step allows of the float32 product (and is not exact: the weights really are
quantized), the engine's logits stay close to float32's, and a GPU or an unknown option is refused."""

import shutil

import pytest
import torch

from deltamem.model import load_model, packed
from deltamem.model.packed import INT4_GROUP, PackedLinear
from tests.test_app import deltamem


@pytest.mark.parametrize("rows", [5, 40])  # a decode step's few rows (the kernels), a prefill's many (dequantized)
@pytest.mark.parametrize("out,inp", [(96, 64), (58, 128)])  # 58 output rows: int4's tiles of 16 padded
def test_quantized_linears_within_their_step(out, inp, rows):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(out, inp, generator=g), torch.randn(out, generator=g), torch.randn(rows, inp, generator=g)
    exact = x @ w.T + b
    # int8: one symmetric step per row, max|w| / 127; rounding moves each weight by at most half a step
    step8 = w.abs().amax(1) / 127
    bound8 = (x.abs() @ (step8[:, None] / 2).expand(out, inp).T) + 1e-4
    err8 = (PackedLinear(w, b, 2, "int8")(x) - exact).abs()
    assert (err8 <= bound8).all() and err8.max() > 0
    # int4: per group of INT4_GROUP inputs, 16 levels between the group's min and max; the activations are rounded
    # to bfloat16 (relative 2^-8) and the kernel sums in bfloat16-scaled steps: allow that on top
    grp = w.reshape(out, inp // INT4_GROUP, INT4_GROUP)
    step4 = ((grp.amax(-1) - grp.amin(-1)) / 15).repeat_interleave(INT4_GROUP, 1)  # [out, inp]
    bound4 = x.abs() @ (step4 / 2 + w.abs() * 2**-7).T + exact.abs() * 2**-7 + 1e-3
    err4 = (PackedLinear(w, b, 2, "int4")(x) - exact).abs()
    assert (err4 <= bound4).all() and err4.max() > 0
    assert err4.mean() > err8.mean()  # 16 levels lose more than 255
    # f16: each weight rounded to half precision (relative 2^-11), the products and sums in float32
    bound16 = x.abs() @ (w.abs() * 2**-11).T + 1e-4
    err16 = (PackedLinear(w, b, 2, "f16")(x) - exact).abs()
    assert (err16 <= bound16).all() and err16.max() > 0
    assert err16.mean() < err8.mean()


def test_engine_logits_stay_close_to_float32():
    ids = torch.randint(3, 200, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    full = load_model("random", window=64).feed(ids)
    for quant, kl_max in (("f16", 1e-5), ("int8", 1e-3), ("int4", 5e-2)):
        eng = load_model("random", window=64, quant=quant)
        assert eng.quant == quant
        got = eng.feed(ids)
        logp, ref = got.log_softmax(-1), full.log_softmax(-1)
        kl = torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="batchmean")
        assert 0 < kl < kl_max, (quant, kl)


def test_auto_quantizes_only_where_decode_is_compiled(monkeypatch):
    # eagerly the quantized paths are slower than float32; compiled, the fastest within 2% perplexity: int8 with
    # AVX-512, f16 below it (benchmarks/results/cpu.md, cpu_avx2.md)
    assert load_model("random", window=64, quant="auto").quant == "none"
    monkeypatch.setattr(packed, "avx512", lambda: True)
    assert load_model("random", window=64, quant="auto", compile_decode=True).quant == "int8"
    monkeypatch.setattr(packed, "avx512", lambda: False)
    assert load_model("random", window=64, quant="auto", compile_decode=True).quant == "f16"


def test_quant_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="one of"):
        load_model("random", window=64, quant="int3")
    r = deltamem("generate", "--model", "random", "--quant", "int3", "x")
    assert r.returncode == 2 and "invalid choice" in r.stderr


needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile needs a C++ compiler")


@needs_cxx
@pytest.mark.parametrize("quant", ["f16", "int8"])
def test_compiled_linear_is_the_weight_only_product(quant):
    """Compiled, an f16 or int8 linear's few-row product is the fused multiply-reduce over the stored weight: the
    same weight-only product as the eager kernel (x times the dequantized weight), not an approximation of it."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    lin = PackedLinear(w, b, 2, quant)
    step = torch.compile(lin, dynamic=False)
    for rows in (1, 3):
        x = torch.randn(rows, 96, generator=g)
        with torch.no_grad():
            got = step(x)
        want = x.double() @ lin.dequantized().double().T + b.double()
        assert torch.allclose(got.double(), want, atol=1e-4)
        assert torch.allclose(lin(x).double(), want, atol=1e-4)  # eagerly


@needs_cxx
def test_int8_codes_in_words_are_the_same_weights(monkeypatch):
    """Without AVX-512 the int8 codes are kept four to an int32 word: the same codes (rows, embedding lookups,
    prefill's dequantized weight), and under torch.compile the same weight-only product."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    monkeypatch.setattr(packed, "avx512", lambda: True)  # one int8 code a byte (as on an AVX-512 CPU)
    plain = PackedLinear(w, b, 2, "int8")
    monkeypatch.setattr(packed, "avx512", lambda: False)
    words = PackedLinear(w, b, 2, "int8")
    assert words.words and words.q.dtype == torch.int32 and words.q.shape == (200, 24)
    assert torch.equal(words.codes8(), plain.q) and torch.equal(words.dequantized(), plain.dequantized())
    ids = torch.tensor([0, 7, 199])
    assert torch.equal(words.rows(ids), plain.rows(ids))
    step = torch.compile(words, dynamic=False)
    for rows in (1, 3, 40):  # 40: prefill's dequantized GEMM
        x = torch.randn(rows, 96, generator=g)
        with torch.no_grad():
            got = step(x)
        want = x.double() @ plain.dequantized().double().T + b.double()
        assert torch.allclose(got.double(), want, atol=1e-4)
        assert torch.allclose(words(x).double(), want, atol=1e-4)




def test_prefill_dequantizes_each_weight_once_per_feed(monkeypatch):
    """A feed of several prefill chunks dequantizes each quantized weight once (not once a chunk), gives the logits
    of the same feed in one chunk, and drops the float32 copies afterwards."""
    ids = torch.randint(3, 200, (48,), generator=torch.Generator().manual_seed(6)).tolist()
    whole = load_model("random", window=64, quant="int8").feed(ids)
    eng = load_model("random", window=64, quant="int8", prefill_chunk=16)  # three chunks
    layers = [m for m in eng.model.modules() if isinstance(m, PackedLinear) and m.quant == "int8"]
    calls = []
    real = PackedLinear.dequantized
    def counted(self, *ids):  # whole weights only: a tied head's embedding rows (ids given) are looked up per chunk
        if not ids:
            calls.append(self)
        return real(self, *ids)

    monkeypatch.setattr(PackedLinear, "dequantized", counted)
    got = eng.feed(ids)
    assert torch.allclose(got, whole, atol=1e-4)
    wide = [m for m in calls if m in layers]
    assert len(wide) == len({id(m) for m in wide}) > 0  # each layer at most once
    assert all(m.wide is None and not m.keep_wide for m in layers)

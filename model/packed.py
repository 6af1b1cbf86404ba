"""CPU weight layout for decode speed.

Decoding one token on a CPU is bound by reading the weights once. MKL's matrix-vector path for `x @ W^T` with a
row-major [out, in] weight streams it on one core (~13 GB/s measured on this machine kind). PackedLinear keeps
the weight as `nb` contiguous [in, out/nb] blocks and runs one bmm over them, so each core streams its own
block: 20-28 GB/s on the same shapes (benchmarks/results/cpu_decode.md). Input projections that read the same
input are fused into one PackedLinear first (q/k/v, gate/up, the six DeltaNet projections), and a tied LM head
also serves the embedding lookup, so no weight is held twice.

Weight-only quantization (`quant`, CPU only) goes through torch's own CPU kernels: "int8" per output channel
(torch._weight_int8pack_mm eagerly; compiled (--compile) a multiply-reduce that inductor fuses, much faster), "int4" in
groups of INT4_GROUP along the input (torch._weight_int4pack_mm_for_cpu, asymmetric, bfloat16 activations), "f16"
half-precision weights (compiled, the same fused multiply-reduce: in AVX2 code a half loads and converts in one
instruction, where int8 codes take several), the LM head included (a tied embedding's rows are dequantized from it).
benchmarks/cpu.py measures each option's speed and perplexity; load_model's "auto" picks int8 (AVX-512) or f16 where
decode is compiled.

Packing is for inference only: a packed model's state_dict no longer has the checkpoint's names; the engine
fingerprints the model before packing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

QUANTS = ("none", "f16", "int8", "int4")
INT4_GROUP = 32
WIDE = 8  # inputs of more rows than this (prefill) run as a dequantized float32 GEMM


def avx512() -> bool:
    """Whether torch runs its AVX-512 code here (ATEN_CPU_CAPABILITY can hold it lower); inductor follows it."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocks: int, quant: str = "none"):
        super().__init__()
        out, inp = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.out_features = out
        self.words = False  # int8 codes packed four to an int32 (see _quantize)
        self.keep_wide, self.wide = False, None  # see dequantized_once
        # int4 needs whole groups along the input (its output rows are padded to its tiles of 16)
        self.quant = quant if quant != "int4" or inp % INT4_GROUP == 0 else "int8"
        if self.quant != "none":
            self._quantize(weight.detach().float())
            return
        nb = blocks if out % blocks == 0 else 1
        # w[j, i, c] = weight[j * m + c, i]: block j holds output rows j*m .. (j+1)*m - 1, transposed.
        self.w = nn.Parameter(weight.detach().reshape(nb, out // nb, inp).transpose(1, 2).contiguous(), False)

    def _quantize(self, w: torch.Tensor) -> None:
        """The kernels' layouts for one-token steps, plus the codes and scales unpacked (one byte a weight) for
        matrices of many rows (prefill), which are cheaper as a dequantized float32 GEMM than through these
        kernels."""
        out, inp = w.shape
        if self.quant == "f16":  # half-precision weights: half the bytes of float32, converted as they load
            self.register_buffer("q", w.half())
            return
        if self.quant == "int8":  # symmetric, one scale per output row
            scale = w.abs().amax(1).clamp(min=1e-12) / 127
            q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            # Without AVX-512, inductor's vector code reads int8 a few bytes at a time through a scalar copy
            # (benchmarks/results/cpu_avx2.md); four codes in one int32 word load as whole vectors instead: with
            # n = in / 4, byte k of word j of a row holds its code k * n + j, so each byte meets a contiguous slice
            self.words = not avx512() and inp % 4 == 0
            if self.words:
                q = q.view(out, 4, inp // 4).transpose(1, 2).contiguous().view(torch.int32).view(out, inp // 4)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
            return
        # int4: per group of INT4_GROUP inputs, w ~ code * scale + low with code in 0..15; torch's kernel takes
        # w = (code - 8) * scale + zero, so zero = low + 8 * scale
        pad = -out % 16
        w = torch.cat([w, w.new_zeros(pad, inp)]) if pad else w
        g = w.reshape(out + pad, inp // INT4_GROUP, INT4_GROUP)
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        codes = ((g - low) / scale).round().clamp(0, 15)
        self.register_buffer("q", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).flatten(1), 1))
        sz = torch.stack([scale[..., 0].t(), (low + 8 * scale)[..., 0].t()], -1)  # [inp / group, out, 2]
        self.register_buffer("scale", sz.to(torch.bfloat16).contiguous())
        # the same weights for wide inputs: codes [out, groups, group] uint8, the kernel's bf16 scale and zero
        self.register_buffer("codes", codes[:out].to(torch.uint8))

    def dequantized(self, ids: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The weight [out, in] float32 as the kernels see it (only rows `ids`, [len(ids), in], if given)."""
        if self.quant == "f16":
            return self.q[ids].float()
        if self.quant == "int8":
            return self.codes8(ids) * self.scale[ids, None]  # int8 times float32: one pass, float32 out
        kept = self.scale[..., : self.out_features, :].transpose(0, 1)[ids].float()  # [rows, groups, 2]
        return ((self.codes[ids].float() - 8) * kept[..., 0:1] + kept[..., 1:2]).flatten(1)

    def codes8(self, ids: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """int8's codes [rows, in] (of rows `ids`), whichever layout holds them."""
        q = self.q[ids]
        if not self.words:
            return q
        n = q.shape[-1]
        return q.view(torch.int8).view(-1, n, 4).transpose(1, 2).reshape(-1, 4 * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.quant != "none" and x2.shape[0] > WIDE:
            w = self.wide if self.wide is not None else self.dequantized().to(x2.dtype)
            if self.keep_wide:
                self.wide = w
            y = x2 @ w.T
        elif self.quant == "f16":
            y = (x2[:, None, :] * self.q).sum(-1) if torch.compiler.is_compiling() else x2 @ self.q.float().T
        elif self.quant == "int8" and torch.compiler.is_compiling():
            # under torch.compile (--compile) inductor fuses this into one loop that reads each int8 weight once:
            # 4x less to stream than float32, and on 2 cores 5-10x faster than torch._weight_int8pack_mm
            if self.words:  # byte k of each word, sign-extended by the arithmetic shift, meets x's k-th quarter
                n = self.q.shape[1]
                y = sum((x2[:, None, k * n : (k + 1) * n] * ((self.q << (24 - 8 * k)) >> 24)).sum(-1) for k in range(4))
                y = y * self.scale
            else:
                y = (x2[:, None, :] * self.q).sum(-1) * self.scale
        elif self.quant == "int8":
            y = torch._weight_int8pack_mm(x2, self.codes8(), self.scale)
        elif self.quant == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.q, INT4_GROUP, self.scale)
            y = y[:, : self.out_features].to(x.dtype)
        else:
            y = self._dense(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        nb, _, m = self.w.shape
        if nb == 1:
            y = x2 @ self.w[0]
        else:
            y = torch.bmm(x2.expand(nb, -1, -1), self.w).transpose(0, 1).reshape(-1, nb * m)
        return y

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the [out, in] weight: the embedding lookup of a tied LM head. ids: [T] -> [T, in]."""
        if self.quant != "none":
            return self.dequantized(ids)
        m = self.w.shape[2]
        return self.w[ids // m, :, ids % m]


@contextlib.contextmanager
def dequantized_once(model: nn.Module) -> Iterator[None]:
    """Within: each quantized layer dequantizes its weight for wide inputs once, not once a prefill chunk (about
    0.1 s a chunk for the default model on 2 cores); the float32 copies are dropped at the end."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.quant != "none"]
    for m in layers:
        m.keep_wide = True
    try:
        yield
    finally:
        for m in layers:
            m.keep_wide, m.wide = False, None


def fuse_linears(linears: list[nn.Linear], blocks: int, quant: str = "none") -> PackedLinear:
    w = torch.cat([lin.weight for lin in linears])
    b = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return PackedLinear(w, b, blocks, quant)


def pack(model: nn.Module, blocks: int | None = None, quant: str = "none") -> nn.Module:
    """Replace every nn.Linear of a CPU model (fused where a module lists FUSE groups) by PackedLinear, with its
    weight quantized as `quant` says.
    On other devices the vendor GEMV is already bandwidth-bound and the plain [out, in] layout stays: only the
    FUSE groups are concatenated into one weight each (Fusable.fuse_views), parameter names unchanged."""
    if getattr(model, "packed", False):
        return model
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}; got {quant!r}")
    if next(model.parameters()).device.type != "cpu":
        if quant != "none":
            raise ValueError("quantized weights (--quant) are a CPU path; on a GPU use --dtype bfloat16")
        with torch.no_grad():
            for mod in list(model.modules()):
                if hasattr(mod, "fuse_views"):
                    mod.fuse_views()
        model.packed = True
        return model.eval()
    blocks = blocks or torch.get_num_threads()
    with torch.no_grad():
        for mod in list(model.modules()):
            if hasattr(mod, "pack"):
                mod.pack(blocks, quant)
        for mod in list(model.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, name, PackedLinear(child.weight, child.bias, blocks, quant))
    model.packed = True
    return model.eval()

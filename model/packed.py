"""CPU weight layout for decode speed.

Decoding one token on a CPU is bound by reading the weights once. MKL's matrix-vector path for `x @ W^T` with a
row-major [out, in] weight streams it on one core (~13 GB/s measured on this machine kind). PackedLinear keeps
the weight as `nb` contiguous [in, out/nb] blocks and runs one bmm over them, so each core streams its own
block: 20-28 GB/s on the same shapes (benchmarks/results/cpu_decode.md). Input projections that read the same
input are fused into one PackedLinear first (q/k/v, gate/up, the six DeltaNet projections), and a tied LM head
also serves the embedding lookup, so no weight is held twice.

Packing is for inference only: a packed model's state_dict no longer has the checkpoint's names; the engine
fingerprints the model before packing it.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocks: int):
        super().__init__()
        out, inp = weight.shape
        nb = blocks if out % blocks == 0 else 1
        # w[j, i, c] = weight[j * m + c, i]: block j holds output rows j*m .. (j+1)*m - 1, transposed.
        self.w = nn.Parameter(weight.detach().reshape(nb, out // nb, inp).transpose(1, 2).contiguous(), False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.out_features = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        nb, _, m = self.w.shape
        if nb == 1:
            y = x2 @ self.w[0]
        else:
            y = torch.bmm(x2.expand(nb, -1, -1), self.w).transpose(0, 1).reshape(-1, nb * m)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the [out, in] weight: the embedding lookup of a tied LM head. ids: [T] -> [T, in]."""
        m = self.w.shape[2]
        return self.w[ids // m, :, ids % m]


def fuse_linears(linears: list[nn.Linear], blocks: int) -> PackedLinear:
    w = torch.cat([lin.weight for lin in linears])
    b = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return PackedLinear(w, b, blocks)


def pack(model: nn.Module, blocks: int | None = None) -> nn.Module:
    """Replace every nn.Linear of a CPU model (fused where a module lists FUSE groups) by PackedLinear.
    On other devices the vendor GEMV is already bandwidth-bound and the plain [out, in] layout stays: only the
    FUSE groups are concatenated into one weight each (Fusable.fuse_views), parameter names unchanged."""
    if getattr(model, "packed", False):
        return model
    if next(model.parameters()).device.type != "cpu":
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
                mod.pack(blocks)
        for mod in list(model.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, name, PackedLinear(child.weight, child.bias, blocks))
    model.packed = True
    return model.eval()

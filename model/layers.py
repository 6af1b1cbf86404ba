"""The layers of a hybrid model, parameter names as in Hugging Face checkpoints so state dicts load as they are.

Every forward takes one sequence without a batch dim (`x: [T, hidden]`) and the layer's own state object from
model/cache.py, which it advances in place: the engine runs one session at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deltamem import kernels
from deltamem.kernels import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule
from deltamem.model.cache import DeltaStack, DeltaState, KVWindow
from deltamem.model.config import LINEAR, ModelConfig
from deltamem.model.packed import PackedLinear, fuse_linears

# A token mixer run in place of a Block's own (Block.forward): (block, h) -> the mixer's output for input h.
Mix = Callable[["Block", torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight; zero-centred (Qwen): * (1 + weight), in float32, the weight kept as
    stored (so checkpoints load as they are and a bfloat16 weight loses nothing to the + 1)."""

    def __init__(self, dim: int, eps: float, zero_centred: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim))
        self.eps = eps
        self.zero_centred = zero_centred

    def scale(self) -> torch.Tensor:
        return self.weight.float() + 1.0 if self.zero_centred else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gpu_inference(x):
            return kernels.rms_norm(x, self.scale(), self.eps)
        if x.dtype == torch.float32 or x.is_cuda:  # one fused op (float accumulation); same formula as below
            # (the weight in x's dtype: a float32 master weight in bfloat16 training would force the unfused path)
            return F.rms_norm(x, (x.shape[-1],), self.scale().to(x.dtype), self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.scale() * xf).to(x.dtype)

    def add_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, self(x + y)); one kernel on the GPU."""
        if _gpu_inference(x):
            return kernels.add_rms_norm(x, y, self.scale(), self.eps)
        s = x + y
        return s, self(s)

    def norm_add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + self(y); one kernel on the GPU."""
        if _gpu_inference(x):
            return kernels.rms_norm_add(x, y, self.scale(), self.eps)
        return x + self(y)


def _gpu_inference(x: torch.Tensor) -> bool:
    """Fused Triton paths: CUDA tensors, no autograd (training runs the plain torch formulas)."""
    return x.is_cuda and not torch.is_grad_enabled()


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head, then times silu(gate): the output norm of Gated DeltaNet."""

    def __init__(self, dim: int, eps: float = 1e-5):  # fla's FusedRMSNormGated default eps, as the reference
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if _gpu_inference(x):
            return kernels.gated_rms_norm(x, gate, self.weight, self.eps)
        if x.is_cuda:  # training: the fused norm (float accumulation) in x's dtype, then the gate
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps) * F.silu(gate.to(x.dtype))
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


class Fusable(nn.Module):
    """A module whose input projections (the Linear children named in FUSE) all read the same input; once
    packed (model/packed.py) they run as one matmul: on the CPU as a PackedLinear that replaces them, on a GPU
    as one contiguous weight of which the Linear weights become views (names and training code unchanged)."""

    FUSE: tuple[str, ...] = ()
    ROWS = 64  # the GPU layout's fused weight has a multiple of this many rows

    def __init__(self) -> None:
        super().__init__()
        self.fused: PackedLinear | None = None
        self.sizes: list[int] = []
        self.fused_w: torch.Tensor | None = None  # GPU layout: [sum(out), in], each FUSE weight a row slice
        self.fused_b: torch.Tensor | None = None

    def project(self, x: torch.Tensor, join: int = 1) -> list[torch.Tensor]:
        """The FUSE projections of x, the first `join` of them as one tensor (a view of the fused output where
        there is one, so no copy)."""
        sizes = [sum(self.sizes[:join]), *self.sizes[join:]]
        if self.fused is not None:
            return list(self.fused(x).split(sizes, dim=-1))
        if self.fused_w is not None and not torch.is_grad_enabled():
            out = F.linear(x, self.fused_w, self.fused_b)  # rows padded to a multiple of ROWS: dropped here
            return list(out.split([*sizes, out.shape[-1] - sum(sizes)], dim=-1))[: len(sizes)]
        parts = [getattr(self, n)(x) for n in self.FUSE]
        return [torch.cat(parts[:join], dim=-1) if join > 1 else parts[0], *parts[join:]]

    def fuse_views(self) -> None:
        """GPU layout: concatenate the FUSE weights once and make each Linear's weight (and bias) a view of
        the result, so one matmul serves them all and no weight is held twice."""
        lins = [getattr(self, n) for n in self.FUSE]
        self.sizes = [lin.out_features for lin in lins]
        # Zero rows up to a multiple of ROWS: with an odd row count (OLMo Hybrid's DeltaNet: 17,340) cuBLAS
        # picks a GEMV for one-token decode that reads the weight at ~40% of HBM bandwidth (its tiled kernels: ~80%).
        pad = -sum(self.sizes) % self.ROWS
        w0 = lins[0].weight
        self.fused_w = torch.cat([*(lin.weight.detach() for lin in lins), w0.new_zeros(pad, w0.shape[1])])
        has_bias = lins[0].bias is not None
        self.fused_b = torch.cat([*(lin.bias.detach() for lin in lins), w0.new_zeros(pad)]) if has_bias else None
        at = 0
        for lin, n in zip(lins, self.sizes, strict=True):
            lin.weight = nn.Parameter(self.fused_w[at : at + n], requires_grad=lin.weight.requires_grad)
            if has_bias:
                lin.bias = nn.Parameter(self.fused_b[at : at + n], requires_grad=lin.bias.requires_grad)
            at += n

    def pack(self, blocks: int, quant: str = "none") -> None:
        lins = [getattr(self, n) for n in self.FUSE]
        self.sizes = [lin.out_features for lin in lins]
        self.fused = fuse_linears(lins, blocks, quant)
        for n in self.FUSE:
            delattr(self, n)


class MLP(Fusable):
    FUSE = ("gate_proj", "up_proj")

    def __init__(self, cfg: ModelConfig, size: int | None = None):
        super().__init__()
        size = size or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)), plus `residual` if given (on the GPU the matmul accumulates onto a copy
        of it: addmm with beta = 1, one copy kernel instead of an add)."""
        gate, up = self.project(x)
        if _gpu_inference(x):
            act = kernels.silu_mul(gate, up)
            if residual is not None:
                flat = residual.reshape(-1, residual.shape[-1]), act.reshape(-1, act.shape[-1])  # [T, *] or [B, T, *]
                return torch.addmm(*flat, self.down_proj.weight.t()).view(residual.shape)
            return self.down_proj(act)
        y = self.down_proj(F.silu(gate) * up)
        return y if residual is None else residual + y


class Experts(nn.Module):
    """The routed experts of a sparse MoE MLP, as transformers holds them in memory: gate_up_proj [E, 2I, H] (each
    expert's gate rows, then its up rows) and down_proj [E, H, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, top: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; top, weights: [T, K] (expert ids and their routing weights) -> [T, H]."""
        t, k = top.shape
        if t == 1:  # decode: gather the K experts' weights on the device (no host sync: CUDA-graph safe)
            gate, up = torch.matmul(self.gate_up_proj[top[0]], x[0]).chunk(2, dim=-1)  # [K, I] each
            y = torch.matmul(self.down_proj[top[0]], (F.silu(gate) * up)[..., None])[..., 0]  # [K, H]
            return (y * weights[0, :, None]).sum(0, keepdim=True)
        out = torch.zeros_like(x)
        order = top.reshape(-1).argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(top.reshape(-1), minlength=self.gate_up_proj.shape[0]).tolist()
        at = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            pairs = order[at : at + n]
            at += n
            tok = pairs // k
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weights.reshape(-1)[pairs, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out


class SparseMoE(nn.Module):
    """Qwen3-Next / Qwen3.5-MoE MLP: a softmax router picks the top-k experts per token (weights renormalised to
    sum to 1 if the config says), plus a shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, top = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        y = self.experts(x, top, weights.to(x.dtype))
        y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y if residual is None else residual + y


class Attention(Fusable):
    """Grouped-query attention over a bounded KVWindow, optional q/k RMSNorm (OLMo: over the projection; Qwen: per
    head, zero-centred), rotary (Llama, Qwen: partial) and a sigmoid output gate (Qwen: q_proj's rows hold each
    head's query then its gate)."""

    FUSE = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.gated = cfg.qwen
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim * (2 if self.gated else 1), bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm == "proj":  # over the whole projection, not per head (OLMo 2/3 style)
            self.q_norm = RMSNorm(self.n_heads * self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.head_dim, cfg.rms_norm_eps)
        elif self.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, zero_centred=True)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, zero_centred=True)

    def forward(self, x: torch.Tensor, kv: KVWindow) -> torch.Tensor:
        # x: [T, hidden]
        t = x.shape[0]
        q, k, v = self.project(x)
        gate = None
        if self.gated:
            q, gate = q.view(t, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(t, self.n_heads, self.head_dim)
        k = k.view(t, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(t, self.n_kv, self.head_dim)
        o = kv.attend(q, k, v)  # [T, H, D]
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(t, -1))


class GatedDeltaNet(Fusable):
    """Gated DeltaNet token mixer (OLMo Hybrid): separate q/k/v/a/b/g projections, short conv, delta rule."""

    FUSE = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._dims(cfg)
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.key_dim, bias=False)
        self.k_proj = nn.Linear(h, self.key_dim, bias=False)
        self.v_proj = nn.Linear(h, self.value_dim, bias=False)
        self.a_proj = nn.Linear(h, self.hv, bias=False)
        self.b_proj = nn.Linear(h, self.hv, bias=False)
        self.g_proj = nn.Linear(h, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, h, bias=False)
        self.o_norm = GatedRMSNorm(self.dv, cfg.linear_norm_eps)

    def _dims(self, cfg: ModelConfig) -> None:
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.beta_scale = 2.0 if cfg.linear_allow_neg_eigval else 1.0  # beta in [0, 2]: negative eigenvalues
        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.dt_bias = nn.Parameter(torch.zeros(self.hv))

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v side by side: the conv's input; a; b; the output gate)."""
        return tuple(self.project(x, join=3))

    def output(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The gated norm and output projection. o, gate: [T, HV, DV]."""
        return self.o_proj(self.o_norm(o, gate).reshape(o.shape[0], self.value_dim))

    def forward(self, x: torch.Tensor, st: DeltaState | DeltaStack) -> torch.Tensor:
        # x: [T, hidden]; st.conv: [W-1, conv_dim]; st.recurrent: [1, HV, DK, DV] float32. Or, with a DeltaStack
        # (model/batch.py), row i of x is the next token of stream i: conv [T, W-1, conv_dim], recurrent [T, ...].
        t = x.shape[0]
        rows = isinstance(st, DeltaStack)
        qkv, a, b, gate = self.inputs(x)
        if rows:
            qkv, conv = kernels.causal_conv1d_rows(qkv, self.conv1d.weight[:, 0], st.conv)
        else:
            qkv, conv = causal_conv1d(qkv, self.conv1d.weight[:, 0], st.conv, inplace=st.inplace)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        g, beta = kernels.delta_gates(a, b, self.A_log, self.dt_bias, self.beta_scale)  # log decay <= 0; [T, HV]
        bt = (t, 1) if rows else (1, t)  # [batch, time]
        args = (q.view(*bt, self.hk, self.dk), k.view(*bt, self.hk, self.dk), v.view(*bt, self.hv, self.dv))
        g, beta = g.view(*bt, self.hv), beta.view(*bt, self.hv)
        if rows or t == 1:
            o, recurrent = recurrent_gated_delta_rule(
                *args, g, beta, initial_state=st.recurrent, inplace=rows or st.inplace
            )
        else:
            o, recurrent = chunk_gated_delta_rule(*args, g, beta, initial_state=st.recurrent)
        st.set(conv, recurrent)  # replaced, or kept in place where a CUDA graph holds the state's addresses
        return self.output(o.view(t, self.hv, self.dv), gate.view(t, self.hv, self.dv))


class QwenGatedDeltaNet(GatedDeltaNet):
    """Qwen3.5's Gated DeltaNet: the same mixer with Qwen's weights: in_proj_qkv (q, k, v rows side by side),
    in_proj_z (the output gate), in_proj_b, in_proj_a, norm and out_proj. (Qwen3-Next's fused in_proj_qkvz /
    in_proj_ba are split into these at load: model/loader.py.)"""

    FUSE = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        Fusable.__init__(self)
        self._dims(cfg)
        h = cfg.hidden_size
        self.in_proj_qkv = nn.Linear(h, 2 * self.key_dim + self.value_dim, bias=False)
        self.in_proj_z = nn.Linear(h, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, self.hv, bias=False)
        self.in_proj_a = nn.Linear(h, self.hv, bias=False)
        self.norm = GatedRMSNorm(self.dv, cfg.linear_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False)

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qkv, z, b, a = self.project(x)
        return qkv, a, b, z

    def output(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.norm(o, gate).reshape(o.shape[0], self.value_dim))


class Block(nn.Module):
    """One decoder layer. Norm placement by kind: pre-norm for Llama, Qwen and OLMo Hybrid's DeltaNet layers,
    post-norm (norm of the sublayer output, before the residual add) for OLMo Hybrid's attention layers."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        eps, zc = cfg.rms_norm_eps, cfg.qwen
        self.linear = cfg.layer_types[index] == LINEAR
        self.post_norm = not self.linear and cfg.post_norm_attention
        if self.linear:
            self.linear_attn = QwenGatedDeltaNet(cfg) if cfg.qwen else GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = SparseMoE(cfg) if index in cfg.moe_layers else MLP(cfg)
        if self.post_norm:
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        else:
            self.input_layernorm = RMSNorm(cfg.hidden_size, eps, zc)
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, zc)

    def forward(self, x: torch.Tensor, state: DeltaState | KVWindow | None, mix: Mix | None = None) -> torch.Tensor:
        """x: [T, hidden], advancing the mixer's `state`. With `mix`, the token mixer's output for its input h is
        mix(self, h) instead: how training (model/train.py) runs batched x [B, T, hidden] through its own stateless
        mixers, with this block's norms, residuals and MLP."""
        mixer = self.linear_attn if self.linear else self.self_attn
        if self.post_norm:
            x = self.post_attention_layernorm.norm_add(x, mixer(x, state) if mix is None else mix(self, x))
            return self.post_feedforward_layernorm.norm_add(x, self.mlp(x))
        h = self.input_layernorm(x)
        x, h = self.post_attention_layernorm.add_norm(x, mixer(h, state) if mix is None else mix(self, h))
        return self.mlp(h, residual=x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.qwen)


class HybridLM(nn.Module):
    """Embeddings, the decoder layers, final norm and LM head (tied to the embeddings if the config says)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head: PackedLinear | None = None  # set by pack()

    def vocab_weight(self) -> torch.Tensor:
        """The output projection's weight (unpacked): the embeddings where they are tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def pack(self, blocks: int, quant: str = "none") -> None:
        """One packed head (quantized as the layers); a tied head also serves the embedding lookup, so the matrix
        is held once."""
        tied = self.config.tie_word_embeddings
        self.head = PackedLinear(self.vocab_weight(), None, blocks, quant)
        if tied:
            del self.model.embed_tokens
        else:
            del self.lm_head

    def hidden(self, ids: torch.Tensor, states: list, mix: Mix | None = None) -> torch.Tensor:
        """ids: [T] -> final hidden states [T, hidden], advancing each layer's state. With `mix` (see Block.forward),
        ids may be [B, T] and states Nones: training's forward (model/train.py)."""
        emb = getattr(self.model, "embed_tokens", None)
        x = emb(ids) if emb is not None else self.head.rows(ids)
        for layer, st in zip(self.model.layers, states, strict=True):
            x = layer(x, st, mix)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(h)
        return F.linear(h, self.vocab_weight())


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "zeros_",
          "ones_", "constant_", "trunc_normal_")


@contextlib.contextmanager
def _no_init():
    """Modules built without their random initialisation (their weights are about to be loaded): on the meta device
    it costs nothing, but its first call imports torch._dynamo (0.8 s of a CLI start)."""
    saved = {n: getattr(nn.init, n) for n in _INITS}
    for n in _INITS:
        setattr(nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def meta_model(cfg: ModelConfig) -> HybridLM:
    """The model's module tree on the meta device, uninitialised: shapes and names, no memory."""
    with torch.device("meta"), _no_init():
        return HybridLM(cfg)

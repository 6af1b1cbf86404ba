"""A batched, differentiable forward of HybridLM for distillation (scripts/distill.py).

The engine (model/engine.py) runs one sequence at a time through stateful caches; training needs a batch of whole
sequences and autograd. This module runs the same blocks (model/layers.py Block and HybridLM: norms, residuals,
MLPs, the tied head) with batched token mixers of its own: Gated DeltaNet through the torch reference chunked op
(gates by kernels/gates_ref.py's delta_gates, as the engine's), and attention either full
(causal) or bounded the way model/cache.py's KVWindow bounds it: token p sees the keys kernels/window.py's
`visible` allows (the first `sink` and the last `window`), and sink keys are scored with the query rotated at
min(p, sink + window - 1). tests/model/test_train.py checks it against the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from deltamem.kernels.chunk_ref import chunk_gated_delta_rule
from deltamem.kernels.gates_ref import delta_gates
from deltamem.kernels.window import visible
from deltamem.model.cache import Rotary
from deltamem.model.layers import Attention, Block, GatedDeltaNet, HybridLM

ChunkOp = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, v, g, beta) -> (o, final state)


def causal_conv_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv) over time: x [B, T, C], w [C, W] (cast to x's dtype) -> [B, T, C] (the DeltaNet
    short conv)."""
    xt = F.pad(x.transpose(1, 2), (w.shape[-1] - 1, 0))  # [B, C, T + W - 1]
    return F.silu(F.conv1d(xt, w.to(x.dtype)[:, None], groups=w.shape[0])).transpose(1, 2)


def delta_mixer(m: GatedDeltaNet, x: torch.Tensor, chunk_op: ChunkOp | None = None) -> torch.Tensor:
    """Gated DeltaNet over a batch from a zero state. x: [B, T, hidden] -> [B, T, hidden]. `chunk_op`: a
    differentiable chunked gated delta rule with the reference's contract (default: the torch reference); q, k, v
    reach it in its `dtype` attribute if it has one (fla's kernels take bfloat16), else in float32; its `conv`
    attribute, if any, replaces causal_conv_silu."""
    b, t, _ = x.shape
    q, k, v, a, beta_in, gate = (getattr(m, n)(x) for n in m.FUSE)
    conv = getattr(chunk_op, "conv", None) or causal_conv_silu  # a fused one (fla's) where the op brings it
    qkv = conv(torch.cat([q, k, v], dim=-1), m.conv1d.weight[:, 0])
    q, k, v = qkv.split([m.key_dim, m.key_dim, m.value_dim], dim=-1)
    g, beta = delta_gates(a, beta_in.float(), m.A_log, m.dt_bias, m.beta_scale)  # beta in float32 here
    dt = getattr(chunk_op, "dtype", torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # the recurrence in float32 even under autocast
        o, _ = (chunk_op or chunk_gated_delta_rule)(
            q.reshape(b, t, m.hk, m.dk).to(dt),
            k.reshape(b, t, m.hk, m.dk).to(dt),
            v.reshape(b, t, m.hv, m.dv).to(dt),
            g,
            beta,
        )
    o = m.o_norm(o.to(x.dtype), gate.view(b, t, m.hv, m.dv))
    return m.o_proj(o.reshape(b, t, m.value_dim))


def attention_mixer(
    m: Attention, x: torch.Tensor, rotary: Rotary | None, window: int | None, sink: int
) -> torch.Tensor:
    """Attention over a batch: full causal (window None) or the engine's bounded sink + window attention."""
    b, t, _ = x.shape
    q, k, v = (getattr(m, n)(x) for n in m.FUSE)
    if m.qk_norm:
        q, k = m.q_norm(q), m.k_norm(k)
    q, k, v = q.view(b, t, m.n_heads, m.head_dim), k.view(b, t, m.n_kv, m.head_dim), v.view(b, t, m.n_kv, m.head_dim)
    pos = torch.arange(t, device=x.device)
    qr, kr = (rotary(q, pos), rotary(k, pos)) if rotary is not None else (q, k)
    rep = m.n_heads // m.n_kv
    d = m.head_dim
    if window is None or t <= sink + window:  # nothing evicted: plain causal attention
        qh, kh, vh = (x.transpose(1, 2) for x in (qr, kr, v))
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=d**-0.5)
        return m.o_proj(o.transpose(1, 2).reshape(b, t, m.n_heads * d))
    # Sink keys are scored against the clamped query, window keys against the true one: put both queries side by
    # side ([q_true, q_sink], 2D wide) and each key in its half ([k, 0] or [0, k]), so one attention call computes
    # both kinds of scores (values padded to the same width for the fused kernels).
    qs = rotary(q, pos.clamp(max=sink + window - 1)) if rotary is not None else q
    is_sink = (pos < sink)[None, :, None, None]
    zero = torch.zeros_like(kr)
    q2 = torch.cat([qr, qs], -1).transpose(1, 2)  # [B, H, T, 2D]
    k2 = torch.cat([torch.where(is_sink, zero, kr), torch.where(is_sink, kr, zero)], -1).transpose(1, 2)
    v2 = F.pad(v, (0, d)).transpose(1, 2)
    k2, v2 = k2.repeat_interleave(rep, dim=1), v2.repeat_interleave(rep, dim=1)
    o = _banded_attention(q2, k2, v2, sink, window, d**-0.5)[..., :d]
    return m.o_proj(o.transpose(1, 2).reshape(b, t, m.n_heads * d))


def _banded_attention(q, k, v, sink: int, window: int, scale: float) -> torch.Tensor:
    """Attention where query p sees the keys j that visible(j, p, sink, window) allows (kernels/window.py). The
    first 2 window queries attend in one call with their dense mask; after them, each block i of `window` queries
    scores only the sink keys and keys [(i-1) window, (i+1) window), with one mask pattern for every block,
    broadcast over batch, heads and blocks (a per-block mask rules out the fused flash kernels).
    q, k, v: [B, H, T, E] -> [B, H, T, E]."""
    b, h, t, e = q.shape
    dev = q.device
    head = min(t, 2 * window)
    pos = torch.arange(head, device=dev)
    j, p = pos[None, :], pos[:, None]
    mask = visible(j, p, sink, window)
    first = F.scaled_dot_product_attention(q[:, :, :head], k[:, :, :head], v[:, :, :head], attn_mask=mask, scale=scale)
    if t <= 2 * window:
        return first
    n = -(-t // window) - 2  # blocks after the first two
    pad = (n + 2) * window - t
    qb = F.pad(q, (0, 0, 0, pad))[:, :, 2 * window :].reshape(b, h * n, window, e)
    s8 = -(-sink // 8) * 8  # sink keys padded to a multiple of 8 (masked), for the fused kernels' alignment
    kb, vb = (
        torch.cat(
            [
                F.pad(x[:, :, None, :sink], (0, 0, 0, s8 - sink)).expand(b, h, n, s8, e),
                F.pad(x, (0, 0, 0, pad))[:, :, window:].unfold(2, 2 * window, window).transpose(-1, -2),
            ],
            3,
        ).reshape(b, h * n, s8 + 2 * window, e)
        for x in (k, v)
    )
    r = torch.arange(window, device=dev)[:, None]  # query p = i window + r, key j = (i-1) window + c
    c = torch.arange(2 * window, device=dev)[None, :]
    sinks = (torch.arange(s8, device=dev) < sink).expand(window, s8)
    # the rest by the window rule, both positions shifted down by (i-1) window (the rule only sees j - p there)
    mask = torch.cat([sinks, visible(c, r + window, 0, window)], -1)  # [window, s8 + 2 window]
    rest = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    return torch.cat([first, rest.view(b, h, n * window, e)], 2)[:, :, :t]


def hidden_states(
    model: HybridLM,
    ids: torch.Tensor,
    window: int | None = None,
    sink: int = 4,
    traces: list[dict] | None = None,
    chunk_op: ChunkOp | None = None,
) -> torch.Tensor:
    """ids [B, T] -> final normed hidden states [B, T, hidden]: HybridLM's own blocks (model/layers.py), their token
    mixers replaced by the batched ones above. `traces`, if given, gets one dict per layer: a pre-norm layer's mixer
    input and output, "in" and "out" (for layer-wise distillation)."""
    if model.config.qwen or model.config.moe_layers:
        raise NotImplementedError("training runs OLMo Hybrid and Llama-family layers, not Qwen's (gated attention)")
    rotary = Rotary.of(model.config)

    def mix(block: Block, h: torch.Tensor) -> torch.Tensor:
        if block.linear:
            out = delta_mixer(block.linear_attn, h, chunk_op)
        else:
            out = attention_mixer(block.self_attn, h, rotary, window, sink)
        if traces is not None:
            traces.append({} if block.post_norm else {"in": h, "out": out})
        return out

    return model.hidden(ids, [None] * len(model.model.layers), mix)


def vocab_weight(model: HybridLM) -> torch.Tensor:
    """The output projection's weight: the embeddings where they are tied."""
    return model.vocab_weight()


def logits(model: HybridLM, h: torch.Tensor) -> torch.Tensor:
    return model.logits(h)

"""One decode token's attention over a bounded KV ring, read in place, in plain torch: the ground truth of
kernels/attn_decode.py, and the CPU path. Which keys the token sees: the window rule, kernels/window.py."""

from __future__ import annotations

import torch

from deltamem.kernels.window import visible


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, p: torch.Tensor, sink: int,
    window: int, scale: float, q_sink: torch.Tensor | None = None, gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one decode token over a bounded KV ring (model/cache.py KVWindow), with no mask tensor.

    q: [H, D], the token's (rotated) queries; k_cache, v_cache: [Hkv, N, D] (N >= sink + window; slots past
    sink + window, and empty ones, hold pos -1); pos: [N] int64, the position each slot holds; p: [1] int64 on the
    device, the token's position (its key already written: kernels/kv_ring_ref.py). Grouped-query: head h reads kv
    head h // (H // Hkv). A slot is seen where kernels/window.py's visible(pos, p, sink, window) says so. q_sink:
    [H, D] or None, the queries that score the sink slots [0, sink) (rotary models rotate them at a clamped
    position); gate: [H, D] or None, a sigmoid output gate (Qwen3.5 / Qwen3-Next). Scores, softmax and the weighted
    sum in fp32 (the Triton kernel, as SDPA, rounds the probabilities to the values' dtype before their product);
    returns [H, D] in q's dtype. Batched (several streams, model/batch.py's KVStack): q, q_sink, gate
    [B, H, D], k_cache, v_cache [B, Hkv, N, D], pos [B, N], p [B]: each row on its own ring."""
    if q.dim() == 3:
        return torch.stack([
            decode_attention(q[i], k_cache[i], v_cache[i], pos[i], p[i : i + 1], sink, window, scale,
                             None if q_sink is None else q_sink[i], None if gate is None else gate[i])
            for i in range(q.shape[0])
        ])  # fmt: skip
    h, d = q.shape
    hkv, n, _ = k_cache.shape
    g = h // hkv
    keys, vals = k_cache.float(), v_cache.float()
    qf = q.float().view(hkv, g, d)
    scores = torch.bmm(qf, keys.transpose(1, 2)) * scale  # [Hkv, G, N]
    if q_sink is not None and sink:
        s = torch.bmm(q_sink.float().view(hkv, g, d), keys[:, :sink].transpose(1, 2)) * scale
        scores = torch.cat([s, scores[..., sink:]], -1)
    seen = visible(pos, p, sink, window)  # [N]
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    out = torch.bmm(probs, vals).view(h, d)
    if gate is not None:
        out = out * torch.sigmoid(gate.float())
    return out.to(q.dtype)

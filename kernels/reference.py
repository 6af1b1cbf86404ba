"""Plain torch reference ops for the Gated DeltaNet layer.

These are the ground truth that the Triton kernels (kernels/*.py, a later issue) must match, and the CPU path of
the engine. All state is float32 whatever the input dtype.

The gated delta rule, per value head, with a recurrent state S of shape [K, V]:

    S_t = exp(g_t) * S_{t-1}                                  (decay)
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T              (delta-rule write)
    o_t = S_t^T (q_t * scale)

`recurrent_gated_delta_rule` runs that loop token by token (decode). `chunk_gated_delta_rule` computes the same
thing a chunk of C tokens at a time (prefill): inside a chunk the C sequential rank-1 updates are folded into one
lower-triangular solve (the UT transform of the WY representation, as in DeltaNet / Gated DeltaNet), so the only
sequential loop is over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the form fla and transformers use)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    # q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]  ->  float32, heads first: [B, HV, T, *]
    if q.shape != k.shape or q.dim() != 4 or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gated delta rule: bad shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    hv, h = v.shape[2], q.shape[2]
    if hv % h or g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(
            f"gated delta rule: value heads {hv} must be a multiple of key heads {h}; "
            f"g{tuple(g.shape)} and beta{tuple(beta.shape)} must be {tuple(v.shape[:3])}"
        )
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    if hv != h:  # grouped values: each key head serves hv // h consecutive value heads
        q, k = q.repeat_interleave(hv // h, dim=2), k.repeat_interleave(hv // h, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * scale
    return [x.transpose(1, 2).float().contiguous() for x in (q, k, v, g, beta)]


def _initial_state(initial_state, b, hv, dk, dv, device):
    if initial_state is None:
        return torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=device)
    if initial_state.shape != (b, hv, dk, dv):
        raise ValueError(f"initial_state{tuple(initial_state.shape)} must be {(b, hv, dk, dv)}")
    return initial_state.float()


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H); g (log decay, <= 0), beta: [B, T, HV].
        scale: query scale, default K ** -0.5. initial_state: [B, HV, K, V] or None (zeros).
    Returns:
        o: [B, T, HV, V] in v's dtype; final state: [B, HV, K, V] float32.

    Example:
        >>> o, s = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s)
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    b, hv, t, dk = k.shape
    state = _initial_state(initial_state, b, hv, dk, v.shape[-1], v.device)
    out = torch.empty_like(v)
    for i in range(t):
        state = state * g[:, :, i].exp()[..., None, None]
        kt = k[:, :, i]  # [B, HV, K]
        delta = (v[:, :, i] - torch.einsum("bhkv,bhk->bhv", state, kt)) * beta[:, :, i, None]
        state = state + kt[..., :, None] * delta[..., None, :]
        out[:, :, i] = torch.einsum("bhkv,bhk->bhv", state, q[:, :, i])
    return out.transpose(1, 2).to(out_dtype), state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule: same contract as `recurrent_gated_delta_rule`, any T (not only multiples of C).

    cu_seqlens (int [N+1], B == 1): N packed independent sequences; initial_state and the final state then have N
    rows. Runs them one after another.

    Example:
        >>> o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s)  # q: [1, 500, 4, 64]
    """
    if cu_seqlens is not None:
        return _varlen(
            chunk_gated_delta_rule, q, k, v, g, beta, scale, initial_state, use_qk_l2norm, cu_seqlens, chunk_size
        )
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    b, hv, t, dk = k.shape
    dv = v.shape[-1]
    state = _initial_state(initial_state, b, hv, dk, dv, v.device)
    c = chunk_size
    pad = (c - t % c) % c
    # Zero padding at the end is harmless: padded rows have beta = 0 and g = 0 (no write, no decay).
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // c
    q, k, v = (x.view(b, hv, n, c, -1) for x in (q, k, v))
    g, beta = g.view(b, hv, n, c), beta.view(b, hv, n, c)

    gcum = g.cumsum(-1)  # log of the decay from the chunk start to position i (inclusive)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(gcum_i - gcum_j) for j <= i, else 0 (masked before exp so it cannot overflow)
    decay = (gcum[..., :, None] - gcum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]
    # UT transform: (I + A) W = beta * [v, k * exp(gcum)], A strictly lower with A_ij = beta_i k_i.k_j decay_ij.
    a = (kb @ k.transpose(-1, -2)) * decay
    a = a.tril(-1) + torch.eye(c, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb * gcum.exp()[..., None]], dim=-1)
    w = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    u, wk = w[..., :dv], w[..., dv:]  # u: values to write if the state were 0; wk: how the old state reads

    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk scores, causal incl. the diagonal
    q_dec = q * gcum.exp()[..., None]  # queries read the old state decayed to their position
    k_dec = k * (gcum[..., -1:] - gcum).exp()[..., None]  # keys decayed to the chunk end
    chunk_decay = gcum[..., -1].exp()[..., None, None]
    # Chunks as separate tensors (unbind) and outputs stacked once: under autograd, slicing chunk i out of a
    # whole tensor (or assigning into one) costs a whole-size zero-fill and add per chunk in the backward.
    u, wk, q_dec, attn, k_dec, chunk_decay = (x.unbind(2) for x in (u, wk, q_dec, attn, k_dec, chunk_decay))
    outs = []
    for i in range(n):
        v_new = u[i] - wk[i] @ state  # delta-rule correction against the state so far
        outs.append(q_dec[i] @ state + attn[i] @ v_new)
        state = state * chunk_decay[i] + k_dec[i].transpose(-1, -2) @ v_new
    out = torch.stack(outs, 2).view(b, hv, n * c, dv)[:, :, :t].transpose(1, 2)
    return out.to(out_dtype), state


def _varlen(op, q, k, v, g, beta, scale, initial_state, use_qk_l2norm, cu_seqlens, chunk_size):
    """op over each packed sequence of a B == 1 batch; states stacked as [N, HV, K, V]."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if q.shape[0] != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[1]:
        raise ValueError(f"cu_seqlens {bounds} must start at 0 and end at T={q.shape[1]}, with batch size 1")
    n, hv, dk, dv = len(bounds) - 1, v.shape[2], q.shape[3], v.shape[3]
    if initial_state is not None and initial_state.shape != (n, hv, dk, dv):
        raise ValueError(f"initial_state{tuple(initial_state.shape)} must be {(n, hv, dk, dv)}")
    outs, states = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        s0 = None if initial_state is None else initial_state[i : i + 1]
        if a == b:
            outs.append(v[:, a:b])
            states.append(_initial_state(s0, 1, hv, dk, dv, v.device))
            continue
        o, s = op(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], scale, s0, use_qk_l2norm, chunk_size)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 1), torch.cat(states, 0)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rmsnorm(x) over the last dim * weight * silu(gate), in x's dtype: model/layers.py GatedRMSNorm's formula."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution with SiLU, continuing from `state`.

    Args:
        x: [T, C] new inputs; weight: [C, W] taps; state: [W-1, C], the previous W-1 inputs (zeros at start).
    Returns:
        y: [T, C] = silu(sum_i weight[:, i] * xx[t + i]) with xx = cat(state, x); new state: [W-1, C].
    """
    xx = torch.cat([state.to(x.dtype), x], dim=0)  # [T+W-1, C]
    t, w = x.shape[0], weight.shape[1]
    weight = weight.to(x.dtype)
    # W shifted multiply-adds: for these few taps this beats conv1d, whose CPU path is slow on [1, C, T] shapes.
    y = xx[:t] * weight[:, 0]
    for i in range(1, w):
        y = y + xx[i : i + t] * weight[:, i]
    return F.silu(y), xx[xx.shape[0] - state.shape[0] :].to(state.dtype)


def causal_conv1d_rows(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d for one new input of each of B independent streams.

    Args:
        x: [B, C], row b the next input of stream b; weight: [C, W]; state: [B, W-1, C].
    Returns:
        y: [B, C], each row what causal_conv1d(x[b:b+1], weight, state[b]) gives; new state: [B, W-1, C].
    """
    xx = torch.cat([state.to(x.dtype), x[:, None]], dim=1)  # [B, W, C]
    # the same multiply-adds in the same order as causal_conv1d, accumulated in float32 as the Triton kernel does
    acc, weight = xx.float(), weight.float()
    y = acc[:, 0] * weight[:, 0]
    for i in range(1, weight.shape[1]):
        y = y + acc[:, i] * weight[:, i]
    return F.silu(y).to(x.dtype), xx[:, 1:].to(state.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim, computed in float32 and rounded once to x's dtype (F.rms_norm)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + y, rms_norm(x + y)): a pre-norm block's residual add and the next norm."""
    s = x + y
    return s, rms_norm(s, weight, eps)


def rms_norm_add(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x + rms_norm(y): a post-norm block's norm and residual add."""
    return x + rms_norm(y, weight, eps)


def delta_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's log decay g = -exp(A_log) * softplus(a + dt_bias) (float32) and write strength
    beta = sigmoid(b) * beta_scale (in b's dtype): model/layers.py GatedDeltaNet's formulas."""
    return -a_log.float().exp() * F.softplus(a.float() + dt_bias), b.sigmoid() * beta_scale


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the gated MLP's activation."""
    return F.silu(gate) * up


def ring_slots(p: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Slots of positions p in a bounded KV ring: the first `sink` positions keep their own slots, later ones
    cycle through the `window` slots after them."""
    return torch.where(p < sink, p, sink + (p - sink) % window)


def kv_step(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    sink: int,
    window: int,
) -> torch.Tensor:
    """Write one decode token into a bounded KV ring (model/cache.py KVWindow) and return its attention mask.

    k_cache, v_cache: [Hkv, sink + window, D], written in place at the token's slot; pos: [sink + window] int64,
    the position each slot holds (-1: empty); k, v: [Hkv, D]; p: [1] int64 on the device, the token's position.
    Returns the additive mask [sink + window] in the cache's dtype: 0 where the token may attend (slots holding
    a sink token or one of the last `window` positions), -inf elsewhere."""
    slot = ring_slots(p, sink, window)
    k_cache.index_copy_(1, slot, k[:, None])
    v_cache.index_copy_(1, slot, v[:, None])
    pos.index_copy_(0, slot, p)
    allowed = (pos >= 0) & ((pos > p - window) | (pos < sink))
    return torch.zeros(pos.shape, dtype=k_cache.dtype, device=pos.device).masked_fill(~allowed, float("-inf"))

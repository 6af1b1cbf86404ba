"""The chunked gated delta rule in plain torch (prefill): the ground truth of kernels/chunk.py, and the CPU path.

Same function as kernels/recurrent_ref.py's token loop, a chunk of C tokens at a time: inside a chunk the C
sequential rank-1 updates are folded into one lower-triangular solve (the UT transform of the WY representation, as in
DeltaNet / Gated DeltaNet), so the only sequential loop is over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltamem.kernels.recurrent_ref import check_state, prepare, start_state


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float | None = None, initial_state: torch.Tensor | None = None, use_qk_l2norm: bool = True,
    chunk_size: int = 64, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule: same contract as kernels/recurrent_ref.py's
    `recurrent_gated_delta_rule`, any T (not only multiples of C).

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
    q, k, v, g, beta = prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    b, hv, t, dk = k.shape
    dv = v.shape[-1]
    state = start_state(initial_state, b, hv, dk, dv, v.device)
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
    check_state(initial_state, (n, hv, dk, dv))
    outs, states = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        s0 = None if initial_state is None else initial_state[i : i + 1]
        if a == b:
            outs.append(v[:, a:b])
            states.append(start_state(s0, 1, hv, dk, dv, v.device))
            continue
        o, s = op(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], scale, s0, use_qk_l2norm, chunk_size)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 1), torch.cat(states, 0)

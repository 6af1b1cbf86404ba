"""The gated delta rule in plain torch, token by token (decode): the ground truth of kernels/recurrent.py and of the
chunked forms (kernels/chunk_ref.py, kernels/chunk.py), and the CPU path. All state is float32 whatever the input
dtype.

The gated delta rule, per value head, with a recurrent state S of shape [K, V]:

    S_t = exp(g_t) * S_{t-1}                                  (decay)
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T              (delta-rule write)
    o_t = S_t^T (q_t * scale)

Also here, shared by the references and the Triton host functions: the input checks and their preparation.
"""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the form fla and transformers use)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def check_inputs(q, k, v, g, beta) -> None:
    """q, k: [B, T, H, K]; v: [B, T, HV, V] with HV a multiple of H; g, beta: [B, T, HV]. Raises ValueError if not."""
    if q.shape != k.shape or q.dim() != 4 or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gated delta rule: bad shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    hv, h = v.shape[2], q.shape[2]
    if hv % h or g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(
            f"gated delta rule: value heads {hv} must be a multiple of key heads {h}; "
            f"g{tuple(g.shape)} and beta{tuple(beta.shape)} must be {tuple(v.shape[:3])}"
        )


def check_state(initial_state: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """An initial state, if given, must be [N, HV, K, V] = shape."""
    if initial_state is not None and initial_state.shape != shape:
        raise ValueError(f"initial_state{tuple(initial_state.shape)} must be {shape}")


def prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """Checked inputs as float32, heads first ([B, HV, T, *]); q and k normalised if asked, repeated to the value
    heads, q times the scale (default K ** -0.5)."""
    check_inputs(q, k, v, g, beta)
    hv, h = v.shape[2], q.shape[2]
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    if hv != h:  # grouped values: each key head serves hv // h consecutive value heads
        q, k = q.repeat_interleave(hv // h, dim=2), k.repeat_interleave(hv // h, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * scale
    return [x.transpose(1, 2).float().contiguous() for x in (q, k, v, g, beta)]


def start_state(state: torch.Tensor | None, b: int, hv: int, dk: int, dv: int, device) -> torch.Tensor:
    """The state to start from, float32 [b, hv, dk, dv]: zeros if None."""
    if state is None:
        return torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=device)
    check_state(state, (b, hv, dk, dv))
    return state.float()


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float | None = None, initial_state: torch.Tensor | None = None, use_qk_l2norm: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H); g (log decay, <= 0), beta: [B, T, HV].
        scale: query scale, default K ** -0.5. initial_state: [B, HV, K, V] or None (zeros).
        inplace: the final state is copied into initial_state (float32), which is returned as the final state.
    Returns:
        o: [B, T, HV, V] in v's dtype; final state: [B, HV, K, V] float32.

    Example:
        >>> o, s = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s)
    """
    out_dtype = v.dtype
    q, k, v, g, beta = prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    b, hv, t, dk = k.shape
    state = start_state(initial_state, b, hv, dk, v.shape[-1], v.device)
    out = torch.empty_like(v)
    for i in range(t):
        state = state * g[:, :, i].exp()[..., None, None]
        kt = k[:, :, i]  # [B, HV, K]
        delta = (v[:, :, i] - torch.einsum("bhkv,bhk->bhv", state, kt)) * beta[:, :, i, None]
        state = state + kt[..., :, None] * delta[..., None, :]
        out[:, :, i] = torch.einsum("bhkv,bhk->bhv", state, q[:, :, i])
    return out.transpose(1, 2).to(out_dtype), (initial_state.copy_(state) if inplace else state)


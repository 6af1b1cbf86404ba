"""Triton decode write into an attention layer's bounded KV ring, with the token's mask; the torch reference is
kernels/kv_ring_ref.py, the window rule kernels/window.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltamem.kernels.triton_util import block


@triton.jit
def _kv_step_kernel(
    k_new, v_new, p_ptr, k_cache, v_cache, pos, mask, CAP, sink, window, HKV, D,
    BH: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
):
    i_c = tl.program_id(0)
    p = tl.load(p_ptr)
    slot = tl.where(p < sink, p, sink + (p - sink) % window)  # kernels/window.py ring_slots
    if i_c == 0:  # one program writes the new key/value rows and the slot's position
        o_h, o_d = tl.arange(0, BH), tl.arange(0, BD)
        m = (o_h < HKV)[:, None] & (o_d < D)[None, :]
        src = o_h[:, None] * D + o_d[None, :]
        dst = o_h[:, None].to(tl.int64) * CAP * D + slot * D + o_d[None, :]
        tl.store(k_cache + dst, tl.load(k_new + src, mask=m), mask=m)
        tl.store(v_cache + dst, tl.load(v_new + src, mask=m), mask=m)
        tl.store(pos + slot, p)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < CAP
    kp = tl.load(pos + o_c, mask=m_c, other=-1)
    # kernels/window.py visible(kp, p, sink, window), less its kp <= p: every filled slot holds a position <= p.
    # The slot being written is allowed whatever this program read there (old or new position).
    ok = ((kp >= 0) & ((kp > p - window) | (kp < sink))) | (o_c == slot)
    tl.store(mask + o_c, tl.where(ok, 0.0, float("-inf")).to(mask.dtype.element_ty), mask=m_c)


def kv_step(
    k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
    sink: int, window: int,
) -> torch.Tensor:
    """One decode token into a bounded KV ring, in one kernel: the contract of kernels/kv_ring_ref.py's kv_step."""
    hkv, cap, d = k_cache.shape
    if v_cache.shape != k_cache.shape or k.shape != (hkv, d) or v.shape != (hkv, d) or pos.shape != (cap,):
        raise ValueError(f"kv_step: cache{tuple(k_cache.shape)} pos{tuple(pos.shape)} k{tuple(k.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and pos.is_contiguous()):
        raise ValueError("kv_step: the cache tensors must be contiguous (they are written in place)")
    # Padded so the mask's rows are 16-byte aligned: SDPA then uses it as it is, with no padded copy.
    buf = torch.empty(-(-cap // 16) * 16, dtype=k_cache.dtype, device=k_cache.device)
    bc = 1024
    _kv_step_kernel[(triton.cdiv(cap, bc),)](
        k.contiguous(),
        v.contiguous(),
        p,
        k_cache,
        v_cache,
        pos,
        buf,
        cap,
        sink,
        window,
        hkv,
        d,
        BH=block(hkv),
        BD=block(d),
        BC=bc,
    )
    return buf[:cap]

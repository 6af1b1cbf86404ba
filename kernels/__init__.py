"""Gated DeltaNet ops, dispatched to the Triton kernels (kernels/triton_gdn.py) or the torch reference.

DELTAMEM_KERNELS picks the backend, read at each call: `auto` (default) uses Triton for CUDA tensors when triton
imports and the torch reference otherwise; `torch` always the reference; `triton` always Triton, which on CPU
tensors works only under TRITON_INTERPRET=1 (set before triton is first imported). Triton is imported lazily, so
CPU-only installs never load it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from types import ModuleType

import torch

from deltamem.kernels import reference
from deltamem.kernels.reference import l2_normalize

__all__ = [
    "add_rms_norm",
    "backend",
    "causal_conv1d",
    "causal_conv1d_rows",
    "chunk_gated_delta_rule",
    "delta_gates",
    "gated_rms_norm",
    "kv_step",
    "l2_normalize",
    "recurrent_gated_delta_rule",
    "rms_norm",
    "rms_norm_add",
    "silu_mul",
]

_MODES = ("auto", "torch", "triton")
_triton_module: ModuleType | None = None
_triton_importable: bool | None = None
fallback_reason: str | None = None  # why CUDA tensors run on the torch reference, once that was decided
log = logging.getLogger("deltamem.kernels")


def _load_triton() -> ModuleType:
    global _triton_module
    if _triton_module is None:
        from deltamem.kernels import triton_gdn

        _triton_module = triton_gdn
    return _triton_module


def _has_triton() -> bool:
    """Whether the Triton kernels load; asked for CUDA tensors only. A fallback is logged once, with its reason."""
    global _triton_importable, fallback_reason
    if _triton_importable is None:
        _triton_importable = False
        if importlib.util.find_spec("triton") is None:
            fallback_reason = "triton is not installed"
        else:
            try:
                _load_triton()
                _triton_importable = True
            except Exception as e:  # a broken triton install (no driver, a mismatched build): fall back to torch
                fallback_reason = f"triton failed to import ({type(e).__name__}: {e})"
        if not _triton_importable:
            log.warning("%s; the Gated DeltaNet ops run on the torch reference (slower on a GPU)", fallback_reason)
    return _triton_importable


def backend(x: torch.Tensor) -> str:
    """'triton' or 'torch': the backend that ops on tensors like x run on under DELTAMEM_KERNELS."""
    mode = os.environ.get("DELTAMEM_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"DELTAMEM_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    if mode == "torch":
        return "torch"
    if mode == "auto":
        return "triton" if x.is_cuda and _has_triton() else "torch"
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("DELTAMEM_KERNELS=triton but triton is not installed (pip install triton)")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "DELTAMEM_KERNELS=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or use DELTAMEM_KERNELS=auto / torch"
        )
    return "triton"


def _impl(x: torch.Tensor) -> ModuleType:
    return _load_triton() if backend(x) == "triton" else reference


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
    """Chunked gated delta rule (prefill); see kernels.reference.chunk_gated_delta_rule."""
    return _impl(q).chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, use_qk_l2norm, chunk_size, cu_seqlens=cu_seqlens
    )


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule (decode); see kernels.reference.recurrent_gated_delta_rule.
    inplace=True: the final state is written into initial_state (float32, contiguous), which is returned."""
    if backend(q) == "triton":
        return _load_triton().recurrent_gated_delta_rule(
            q, k, v, g, beta, scale, initial_state, use_qk_l2norm, inplace=inplace
        )
    o, state = reference.recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)
    return (o, initial_state.copy_(state)) if inplace else (o, state)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU continuing from state; see kernels.reference.causal_conv1d.
    inplace=True: the new state is written into `state`, which is returned."""
    if backend(x) == "triton":
        return _load_triton().causal_conv1d(x, weight, state, inplace=inplace)
    y, new = reference.causal_conv1d(x, weight, state)
    return (y, state.copy_(new)) if inplace else (y, new)


def causal_conv1d_rows(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d for one input of each of B streams (batched decode); see kernels.reference.causal_conv1d_rows.
    A few elementwise ops on [B, C]: the torch reference on every device."""
    return reference.causal_conv1d_rows(x, weight, state)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rmsnorm(x) over the last dim * weight * silu(gate), in x's dtype (Gated DeltaNet's output norm)."""
    return _impl(x).gated_rms_norm(x, gate, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim in float32, rounded once to x's dtype."""
    return _impl(x).rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + y, rms_norm(x + y, weight)): residual add then the next pre-norm, in one pass on the GPU."""
    return _impl(x).add_rms_norm(x, y, weight, eps)


def rms_norm_add(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x + rms_norm(y, weight): a post-norm and its residual add, in one pass on the GPU."""
    return _impl(x).rms_norm_add(x, y, weight, eps)


def delta_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's (g, beta) from its a/b projections; see kernels.reference.delta_gates."""
    return _impl(a).delta_gates(a, b, a_log, dt_bias, beta_scale)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the gated MLP's activation) in one kernel on the GPU."""
    return _impl(gate).silu_mul(gate, up)


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
    """One decode token into a bounded KV ring and its additive attention mask; see kernels.reference.kv_step."""
    return _impl(k_cache).kv_step(k_cache, v_cache, pos, k, v, p, sink, window)

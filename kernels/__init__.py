"""Gated DeltaNet ops, dispatched to their Triton kernels or their torch references.

One module per op, each beside its torch reference: chunk.py / chunk_ref.py (the chunked gated delta rule, prefill),
recurrent.py / recurrent_ref.py (the rule token by token, decode), conv.py / conv_ref.py (the short conv),
norm.py / norm_ref.py (RMSNorms), gates.py / gates_ref.py (DeltaNet's gates, silu_mul), kv_ring.py / kv_ring_ref.py
(kv_step: a decode token into a bounded KV ring), attn_decode.py / attn_decode_ref.py (decode_attention: that token's
attention over the ring, read in place). window.py holds the window rule those and model/cache.py share,
triton_util.py what the Triton modules share; triton_ops.py and reference.py gather each backend's ops by name.

DELTAMEM_KERNELS picks the backend, read at each call: `auto` (default) uses Triton for CUDA tensors when triton
imports and the torch reference otherwise; `torch` always the reference; `triton` always Triton, which on CPU
tensors works only under TRITON_INTERPRET=1 (set before triton is first imported). Triton is imported lazily, so
CPU-only installs never load it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import ParamSpec, TypeVar

import torch

from deltamem.kernels import reference

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["backend", *reference.__all__]  # every reference op, dispatched or re-exported below

_MODES = ("auto", "torch", "triton")
_triton_module: ModuleType | None = None
_triton_importable: bool | None = None
fallback_reason: str | None = None  # why CUDA tensors run on the torch reference, once that was decided
log = logging.getLogger("deltamem.kernels")


def _load_triton() -> ModuleType:
    global _triton_module
    if _triton_module is None:
        from deltamem.kernels import triton_ops

        _triton_module = triton_ops
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


def _dispatched(ref: Callable[P, R]) -> Callable[P, R]:
    """The op named like `ref`, run by the backend that backend() picks for its first argument (a tensor). Arguments,
    types and docs are the reference's (kernels/*_ref.py); each Triton op keeps that contract."""
    name = ref.__name__

    @functools.wraps(ref)
    def op(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        return getattr(_impl(first), name)(*args, **kwargs)

    return op


# Prefill and decode of the gated delta rule; inplace=True (decode) writes the final state into initial_state.
chunk_gated_delta_rule = _dispatched(reference.chunk_gated_delta_rule)
recurrent_gated_delta_rule = _dispatched(reference.recurrent_gated_delta_rule)
# Depthwise causal conv + SiLU continuing from a state; inplace=True writes the new state into `state`.
causal_conv1d = _dispatched(reference.causal_conv1d)
# causal_conv1d for one input of each of B streams (batched decode): a few elementwise ops on [B, C], the torch
# reference on every device
causal_conv1d_rows = reference.causal_conv1d_rows
gated_rms_norm = _dispatched(reference.gated_rms_norm)  # Gated DeltaNet's output norm
rms_norm = _dispatched(reference.rms_norm)
add_rms_norm = _dispatched(reference.add_rms_norm)  # residual add then the next pre-norm, one pass on the GPU
rms_norm_add = _dispatched(reference.rms_norm_add)  # a post-norm and its residual add, one pass on the GPU
delta_gates = _dispatched(reference.delta_gates)
silu_mul = _dispatched(reference.silu_mul)  # the gated MLP's activation
kv_step = _dispatched(reference.kv_step)  # one decode token into a bounded KV ring, and its attention mask
# one decode token's attention over a bounded KV ring, read in place; a fixed reduction order (bit-identical runs)
decode_attention = _dispatched(reference.decode_attention)
l2_normalize = reference.l2_normalize

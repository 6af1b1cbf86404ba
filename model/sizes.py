"""What a model costs, from its config alone (no weights): parameters, the memory state of one session, the bytes a
turn adds to the store, and the GPU memory it needs. `deltamem info` prints these; the README's table comes from
benchmarks/model_sizes.py."""

from __future__ import annotations

import math

import torch

from deltamem.model.cache import PAGE, DeltaState
from deltamem.model.config import ModelConfig
from deltamem.model.device import HEADROOM
from deltamem.model.engine import empty_states
from deltamem.model.layers import meta_model

TURN_TOKENS = 200  # a typical agent turn: prompt + reply


def model_sizes(
    cfg: ModelConfig, window: int | None = 4096, sink: int = 4, dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Sizes in bytes for `dtype` weights and state. The state: every DeltaNet layer's conv + recurrent matrix
    (float32) and every attention layer's sink + window KV cache (window None: per token seen, reported per 1k
    tokens). A turn rewrites all recurrent states and the KV pages its tokens land in (a 200-token turn: at most two
    pages of 256 slots per attention layer); the store keeps the unchanged pages once."""
    model = meta_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    active = params - len(cfg.moe_layers) * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    item = dtype.itemsize
    states = empty_states(cfg, window, sink, dtype, "meta")
    recurrent = sum((s.conv.numel() * s.conv.element_size() + s.recurrent.numel() * 4)
                    for s in states if isinstance(s, DeltaState))
    attn = sum(1 for s in states if not isinstance(s, DeltaState))
    per_token_kv = attn * 2 * cfg.num_key_value_heads * cfg.head_dim * item
    kv = per_token_kv * (sink + window) if window is not None else 0
    slots = (math.ceil(TURN_TOKENS / PAGE) + 1) * PAGE  # the pages a turn's tokens can land in
    turn = recurrent + min(slots, sink + window if window else slots) * per_token_kv
    return {
        "parameters": params,
        "active_parameters": active,
        "weight_bytes": params * item,
        "state_bytes": recurrent + kv,
        "recurrent_state_bytes": recurrent,
        "kv_bytes_per_token": per_token_kv,
        "turn_bytes": turn,
        "gpu_bytes": params * item + recurrent + kv + HEADROOM,
        "dtype": str(dtype).removeprefix("torch."),
        "window": window,
        "sink": sink,
    }

"""Tiny random transformers models saved with save_pretrained: the independent reference for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

OLMO_SHAPES = {
    # two 3:1 blocks, GQA in attention, rotary
    "olmo_gqa_rope": dict(
        hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96
    ),
    # odd hidden size, no rotary (as the released checkpoints), grouped values in the DeltaNet layers
    "olmo_odd_nope": dict(
        hidden_size=72, num_hidden_layers=5, num_attention_heads=3, num_key_value_heads=1, intermediate_size=100,
        linear_num_key_heads=3, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=20,
        linear_allow_neg_eigval=False, rope=False,
    ),
}
LLAMA_SHAPES = {
    "llama_gqa": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96),
    "llama_odd_bias_tied": dict(hidden_size=60, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=5,
                                intermediate_size=77, head_dim=16, attention_bias=True, tie_word_embeddings=True),
}


def make_olmo_hybrid(out: Path, vocab: int = 320, dtype=torch.float32, seed: int = 0, **kw) -> torch.nn.Module:
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    rope = kw.pop("rope", True)
    cfg = OlmoHybridConfig(vocab_size=vocab, eos_token_id=1, pad_token_id=0, **kw)
    if not rope:  # how released checkpoints say NoPE
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": None}
    torch.manual_seed(seed)
    model = OlmoHybridForCausalLM(cfg).eval()
    _spread_norms(model)
    model.to(dtype).save_pretrained(out)
    return model.float()


def make_llama(out: Path, vocab: int = 320, dtype=torch.float32, seed: int = 0, **kw) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=None, **kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    _spread_norms(model)
    model.to(dtype).save_pretrained(out)
    return model.float()

_QWEN_BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=12)
QWEN_SHAPES = {
    # (family, config): GQA, more value heads than key heads, partial rotary (transformers' default 0.25)
    "qwen3_5_gqa": ("qwen3_5", dict(_QWEN_BASE, num_hidden_layers=4)),
    # tied head, full rotary, irregular layer pattern, equal key and value heads, MHA
    "qwen3_5_tied_irregular": ("qwen3_5", dict(
        _QWEN_BASE, num_hidden_layers=5, num_key_value_heads=4, tie_word_embeddings=True,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_num_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                                   "partial_rotary_factor": 1.0})),
    # the multimodal wrapper: text model under model.language_model, a vision tower to ignore
    "qwen3_5_multimodal": ("qwen3_5_vl", dict(_QWEN_BASE, num_hidden_layers=4)),
    # sparse MoE top-k with a gated shared expert in every layer
    "qwen3_5_moe": ("qwen3_5_moe", dict(_QWEN_BASE, num_hidden_layers=4, num_experts=6, num_experts_per_tok=2,
                                       moe_intermediate_size=24, shared_expert_intermediate_size=20)),
    # fused qkvz / ba projections, MoE on every other layer with one dense layer, un-normalised top-k
    "qwen3_next": ("qwen3_next", dict(_QWEN_BASE, num_hidden_layers=4, num_experts=5, num_experts_per_tok=3,
                                     moe_intermediate_size=24, shared_expert_intermediate_size=20,
                                     decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False,
                                     linear_num_value_heads=6)),
}


def make_qwen(out: Path, family: str, vocab: int = 320, dtype=torch.float32, seed: int = 0, **kw) -> torch.nn.Module:
    """A tiny random Qwen3.5 / Qwen3.5-MoE / Qwen3-Next (or the Qwen3.5 multimodal wrapper: "qwen3_5_vl") saved
    with save_pretrained; returns the float32 model whose logits are the reference."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(vocab_size=vocab, eos_token_id=1, pad_token_id=0, **kw)
    if family == "qwen3_5_vl":
        vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=20, out_hidden_size=kw["hidden_size"])
        model = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=vision))
    else:
        cfg_cls, model_cls = {
            "qwen3_5": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM),
            "qwen3_5_moe": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM),
            "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM),
        }[family]
        model = model_cls(cfg_cls(**text))
    model.eval()
    _spread_norms(model)
    model.to(dtype).save_pretrained(out)
    return model.float()


def _spread_norms(model: torch.nn.Module) -> None:
    """Random init leaves every norm weight at 1 and biases at 0; randomise them so a wrong placement shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or name.endswith("mlp.gate.weight"):  # random routers: experts actually differ
                p.normal_(0, 1, generator=g)
            elif p.dim() == 1 and ("norm" in name or name.endswith("bias")) and "dt_bias" not in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name
                        else 0.1 * torch.randn(p.shape, generator=g))

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


def _spread_norms(model: torch.nn.Module) -> None:
    """Random init leaves every norm weight at 1 and biases at 0; randomise them so a wrong placement shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("bias")) and "dt_bias" not in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name
                        else 0.1 * torch.randn(p.shape, generator=g))

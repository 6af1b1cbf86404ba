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
        hidden_size=72,
        num_hidden_layers=5,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=100,
        linear_num_key_heads=3,
        linear_num_value_heads=6,
        linear_key_head_dim=16,
        linear_value_head_dim=20,
        linear_allow_neg_eigval=False,
        rope=False,
    ),
}
LLAMA_SHAPES = {
    "llama_gqa": dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96
    ),
    "llama_odd_bias_tied": dict(
        hidden_size=60,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=5,
        intermediate_size=77,
        head_dim=16,
        attention_bias=True,
        tie_word_embeddings=True,
    ),
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


_QWEN_BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=12,
)
QWEN_SHAPES = {
    # (family, config): GQA, more value heads than key heads, partial rotary (transformers' default 0.25)
    "qwen3_5_gqa": ("qwen3_5", dict(_QWEN_BASE, num_hidden_layers=4)),
    # tied head, full rotary, irregular layer pattern, equal key and value heads, MHA
    "qwen3_5_tied_irregular": (
        "qwen3_5",
        dict(
            _QWEN_BASE,
            num_hidden_layers=5,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            layer_types=[
                "linear_attention",
                "full_attention",
                "linear_attention",
                "linear_attention",
                "full_attention",
            ],
            linear_num_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0},
        ),
    ),
    # the multimodal wrapper: text model under model.language_model, a vision tower to ignore
    "qwen3_5_multimodal": ("qwen3_5_vl", dict(_QWEN_BASE, num_hidden_layers=4)),
    # sparse MoE top-k with a gated shared expert in every layer
    "qwen3_5_moe": (
        "qwen3_5_moe",
        dict(
            _QWEN_BASE,
            num_hidden_layers=4,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
        ),
    ),
    # fused qkvz / ba projections, MoE on every other layer with one dense layer, un-normalised top-k
    "qwen3_next": (
        "qwen3_next",
        dict(
            _QWEN_BASE,
            num_hidden_layers=4,
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            norm_topk_prob=False,
            linear_num_value_heads=6,
        ),
    ),
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
                p.copy_(
                    1.0 + 0.3 * torch.randn(p.shape, generator=g)
                    if "norm" in name
                    else 0.1 * torch.randn(p.shape, generator=g)
                )


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)  # Qwen3.5's tokenizer.json pre-tokenizer


def save_qwen_tokenizer(out: Path, chat_template: str) -> tuple[list[str], list[str]]:
    """A byte-level BPE tokenizer in Qwen3.5's layout (its Split regex + ByteLevel, ChatML specials, the chat template
    in chat_template.jinja) small enough for the tiny models' 320-token vocabulary: the 256 byte tokens, a few merges
    whose use depends on the split (a letter with a combining accent, two digits, a space before a letter), the
    specials after them. Saved with the tokenizers library; returns the token strings in id order and the merges
    (as GGUF stores them: "left right")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    b2u = {b: c for b, c in zip(bytes(range(256)), _byte_chars(), strict=True)}
    alphabet = [b2u[b] for b in range(256)]
    pairs = [
        (b2u[ord("e")], b2u[0xCC]),
        (b2u[ord("e")] + b2u[0xCC], b2u[0x81]),
        (b2u[ord("1")], b2u[ord("2")]),
        (b2u[ord(" ")], b2u[ord("n")]),
        (b2u[ord("a")], b2u[ord("i")]),
    ]
    alphabet += [a + b for a, b in pairs]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(QWEN_SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "tokenizer_class": "Qwen2Tokenizer"}')
    (out / "chat_template.jinja").write_text(chat_template)
    return alphabet + QWEN_SPECIALS, [f"{a} {b}" for a, b in pairs]


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]

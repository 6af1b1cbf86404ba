"""Model configuration, parsed from a Hugging Face `config.json` (OLMo Hybrid, Llama, Qwen3.5, Qwen3-Next).

One dataclass serves every family: a Llama is a hybrid whose layers are all attention, with pre-norm
blocks, no q/k norms and rotary positions (its `layer_types` may also list Gated DeltaNet layers: deltamem's
distilled default model is such a Llama); OLMo Hybrid puts three Gated DeltaNet layers before each attention
layer, uses post-norm attention blocks with q/k RMSNorms, and its released checkpoints have no rotary at all.
The Qwen families (`qwen3_5`, `qwen3_5_moe`, `qwen3_next`) are pre-norm with zero-centred RMSNorms (x * (1 + w)),
attention whose output is gated by a sigmoid of a second half of q_proj, per-head q/k norms, partial rotary, and
(the MoE ones) a sparse top-k MLP with a gated shared expert.
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
QWEN = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
ARCHS = ("olmo_hybrid", "llama", *QWEN)
# model_type in config.json -> arch. The Qwen3.5 multimodal checkpoints hold the text model under text_config.
MODEL_TYPES = {
    "olmo_hybrid": "olmo_hybrid",
    "llama": "llama",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_next": "qwen3_next",
}
# Fields added after sessions were first saved: left out of to_dict() (the model's identity) at their defaults, so
# the fingerprints of the models that existed before them do not change.
_LATER = {
    "rotary_dim": 0,
    "num_experts": 0,
    "num_experts_per_tok": 0,
    "moe_intermediate_size": 0,
    "shared_expert_intermediate_size": 0,
    "norm_topk_prob": True,
    "moe_layers": [],
}


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
    rotary_dim: int = 0  # dims of each head that rotate (partial rotary); 0: all of them
    num_experts: int = 0  # sparse MoE MLP (qwen3_5_moe, qwen3_next) in the layers of moe_layers
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[int] = field(default_factory=list)

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
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise CheckpointError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        if self.moe_layers and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts ({self.num_experts})"
            )
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            raise CheckpointError(f"moe_layers {self.moe_layers} name layers this model does not have")

    @property
    def post_norm_attention(self) -> bool:
        """OLMo-style attention blocks normalise the sublayer outputs; Llama and Qwen normalise their inputs."""
        return self.arch == "olmo_hybrid"

    @property
    def qk_norm(self) -> str | None:
        """"proj": one RMSNorm over the whole q/k projection (OLMo); "head": over each head (Qwen); None."""
        return "proj" if self.arch == "olmo_hybrid" else "head" if self.qwen else None

    @property
    def qwen(self) -> bool:
        """Zero-centred norms, output-gated attention, fused DeltaNet input projections (Qwen3.5 / Qwen3-Next)."""
        return self.arch in QWEN

    @property
    def linear_norm_eps(self) -> float:
        """The DeltaNet output norm's eps: fla's default 1e-5 for OLMo Hybrid, the config's for Qwen."""
        return self.rms_norm_eps if self.qwen else 1e-5

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in _LATER or v != _LATER[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict (see MODEL_TYPES for the model types it reads)."""
        arch = MODEL_TYPES.get(hf.get("model_type"))
        if arch is None:
            raise CheckpointError(
                f"config.json has model_type {hf.get('model_type')!r}; deltamem loads "
                f"{', '.join(sorted(MODEL_TYPES))} checkpoints"
            )
        if arch in QWEN:
            try:
                return cls._from_qwen(hf, arch)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"config.json is missing or has a bad value for {e}") from e
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
    def _from_qwen(cls, hf: dict[str, Any], arch: str) -> ModelConfig:
        """Qwen3.5 (dense or MoE; the text part of a multimodal config) and Qwen3-Next, with transformers' defaults
        for keys a config.json leaves out."""
        text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
        tied = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))  # the wrapper's says
        if text.get("hidden_act", "silu") != "silu":
            raise CheckpointError("only SiLU MLPs are supported")
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or 256)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default":  # text-only MRoPE (mrope_section) is plain rotary: all three position ids are equal
            raise CheckpointError(f"rope_type {kind!r} is not supported (only default rotary)")
        theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
        partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
        types = text.get("layer_types")
        if not types:
            every = int(text.get("full_attention_interval", 4))
            types = [LINEAR if (i + 1) % every else ATTENTION for i in range(layers)]
        moe: dict[str, Any] = {}
        experts = int(text.get("num_experts", 0 if arch == "qwen3_5" else 256 if arch == "qwen3_5_moe" else 512))
        if arch != "qwen3_5" and experts:
            step = int(text.get("decoder_sparse_step", 1))
            dense = set(text.get("mlp_only_layers") or [])
            moe = dict(
                num_experts=experts,
                num_experts_per_tok=int(text.get("num_experts_per_tok", 8 if arch == "qwen3_5_moe" else 10)),
                moe_intermediate_size=int(text.get("moe_intermediate_size", 512)),
                shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size", 512)),
                norm_topk_prob=True if arch == "qwen3_5_moe" else bool(text.get("norm_topk_prob", True)),
                moe_layers=[i for i in range(layers) if i not in dense and (i + 1) % step == 0],
            )
        return cls(
            arch=arch,
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text.get("intermediate_size") or 0),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=None if theta is None else float(theta),
            rotary_dim=int(head_dim * partial),
            attention_bias=bool(text.get("attention_bias", False)),
            layer_types=list(types),
            linear_num_key_heads=int(text.get("linear_num_key_heads", 16)),
            linear_num_value_heads=int(text.get("linear_num_value_heads", 32)),
            linear_key_head_dim=int(text.get("linear_key_head_dim", 128)),
            linear_value_head_dim=int(text.get("linear_value_head_dim", 128)),
            linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
            linear_allow_neg_eigval=False,  # beta = sigmoid(b), in (0, 1)
            tie_word_embeddings=bool(tied),
            max_position_embeddings=int(text.get("max_position_embeddings") or 32768),
            bos_token_id=text.get("bos_token_id", hf.get("bos_token_id")),
            eos_token_id=text.get("eos_token_id", hf.get("eos_token_id")),
            **moe,
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

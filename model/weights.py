"""Checkpoint tensors -> a HybridLM: each model tensor's source names in a checkpoint (Hugging Face, GGUF-mapped
and Qwen3-Next layouts), and `build`, which loads them one at a time onto the device, checking names and shapes."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from deltamem.model.config import ModelConfig
from deltamem.model.device import check_fits
from deltamem.model.engine import Fingerprint
from deltamem.model.errors import CheckpointError
from deltamem.model.layers import HybridLM, meta_model

log = logging.getLogger(__name__)


@dataclass
class Source:
    """Where one model tensor comes from: checkpoint tensors `names`, joined by `combine` (default: the one tensor,
    or several concatenated along dim 0)."""

    names: list[str]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.combine is not None:
            return self.combine(parts)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
IGNORED = ("model.visual.", "mtp.")  # Qwen3.5's vision tower, Qwen's multi-token-prediction head


def canonical_sources(names: Iterable[str], cfg: ModelConfig | None = None) -> dict[str, Source]:
    """Model name -> the checkpoint tensors that make it. OLMo Hybrid checkpoints as released (and as transformers
    saves them) name the DeltaNet pre-norms attention_layer_norm / feedforward_layer_norm and keep q/k/v short
    convs apart; the module tree (ours and transformers' in memory) has input_layernorm / post_attention_layernorm and
    one fused conv1d. Qwen3.5 multimodal checkpoints keep the text model under model.language_model; MoE checkpoints
    store each expert apart (held here as transformers does: one [E, 2I, H] gate_up and one [E, H, I] down tensor);
    Qwen3-Next fuses the DeltaNet input projections per key head (split into Qwen3.5's here). Rotary inverse
    frequencies, the vision tower and multi-token-prediction weights (IGNORED) are dropped."""
    names = {n for n in names if not n.startswith(IGNORED)}
    out: dict[str, Source] = {}
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for k in sorted(names):
        if k.endswith(("rotary_emb.inv_freq", ".linear_attn.k_conv1d.weight", ".linear_attn.v_conv1d.weight")):
            continue
        c = k.replace("model.language_model.", "model.", 1) if k.startswith("model.language_model.") else k
        c = c.replace(".attention_layer_norm.", ".input_layernorm.")
        c = c.replace(".feedforward_layer_norm.", ".post_attention_layernorm.")
        if m := _EXPERT.fullmatch(c):
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = k
        elif k.endswith(".linear_attn.q_conv1d.weight"):
            base = k.removesuffix("q_conv1d.weight")
            parts = [f"{base}{x}_conv1d.weight" for x in "qkv"]
            absent = [n for n in parts if n not in names]
            if absent:
                raise CheckpointError(f"checkpoint has {k} but not {absent[0]}")
            out[base + "conv1d.weight"] = Source(parts)
        elif c.endswith((".linear_attn.in_proj_qkvz.weight", ".linear_attn.in_proj_ba.weight")):
            if cfg is None:
                raise CheckpointError(f"{k} needs the model config to be split")
            base = c.rsplit(".in_proj_", 1)[0]
            for name, split in _qwen3_next_split(c, cfg).items():
                out[f"{base}.{name}.weight"] = Source([k], split)
        else:
            out[c] = Source([k])
    for base, by_expert in experts.items():
        n = max(by_expert) + 1
        need = [(e, w) for e in range(n) for w in ("gate_proj", "up_proj", "down_proj")]
        absent = [f"{base}.{e}.{w}.weight" for e, w in need if w not in by_expert.get(e, {})]
        if absent:
            raise CheckpointError(f"checkpoint lacks {absent[0]}")
        gate_up = [by_expert[e][w] for e in range(n) for w in ("gate_proj", "up_proj")]
        out[f"{base}.gate_up_proj"] = Source(gate_up, lambda ts: torch.stack([torch.cat(ts[i : i + 2]) for i in
                                                                                range(0, len(ts), 2)]))
        out[f"{base}.down_proj"] = Source([by_expert[e]["down_proj"] for e in range(n)], torch.stack)
    return out


def _qwen3_next_split(name: str, cfg: ModelConfig) -> dict[str, Callable[[list[torch.Tensor]], torch.Tensor]]:
    """Qwen3-Next's in_proj_qkvz rows hold, per key head, its q, k, then the v and z rows of the value heads it
    serves; in_proj_ba per key head its b then a rows. -> Qwen3.5's in_proj_qkv / _z / _b / _a."""
    hk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // max(hk, 1)

    def part(sizes: list[int], pick: list[int]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        def f(ts: list[torch.Tensor]) -> torch.Tensor:
            w = ts[0]
            if w.shape[0] != hk * sum(sizes):
                raise CheckpointError(f"{name} has {w.shape[0]} rows, config implies {hk * sum(sizes)}")
            heads = w.reshape(hk, sum(sizes), *w.shape[1:]).split(sizes, dim=1)
            return torch.cat([heads[i].reshape(-1, *w.shape[1:]) for i in pick])

        return f

    if name.endswith("in_proj_qkvz.weight"):
        sizes = [dk, dk, r * dv, r * dv]
        return {"in_proj_qkv": part(sizes, [0, 1, 2]), "in_proj_z": part(sizes, [3])}
    return {"in_proj_b": part([r, r], [0]), "in_proj_a": part([r, r], [1])}


class Tensors(Protocol):
    """Where a checkpoint's tensors come from: names, and one tensor at a time (on the CPU). `owned`: the tensors
    may become the model's own (else they are views of a file and are copied into place)."""

    owned: bool

    def keys(self) -> Iterable[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class InMemory:
    """A state dict already in memory (a GGUF's dequantised weights, the default model's merged ones)."""

    owned = True

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd

    def keys(self) -> Iterable[str]:
        return self.sd.keys()

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]


class SafetensorsFiles:
    """A (sharded) safetensors checkpoint read lazily through safetensors' own memory map: each tensor is a view of
    its file's pages, copied (and cast) straight into the model's tensor on the target device, then unmapped. The
    host never holds a copy of the model, nor a float32 one of a tensor that runs in another dtype."""

    owned = False

    def __init__(self, root: Path):
        index = root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {k: root / f for k, f in weight_map.items()}
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        elif (root / "model.safetensors").exists():
            self.files = {k: root / "model.safetensors" for k in self._names(root / "model.safetensors")}
        else:
            raise CheckpointError(f"{root} has no model.safetensors or model.safetensors.index.json")
        for f in sorted(set(self.files.values())):  # every shard readable and as its index says, before loading
            missing = {k for k, v in self.files.items() if v == f} - set(self._names(f))
            if missing:
                raise CheckpointError(f"{f} lacks {sorted(missing)[:3]}, which its index places there")

    @staticmethod
    def _names(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read weights {path}: {e}") from e

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def get(self, name: str) -> torch.Tensor:
        try:
            with safe_open(self.files[name], framework="pt") as f:
                return f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read {name} from {self.files[name]}: {e}") from e


def build(
    cfg: ModelConfig,
    tensors: Tensors | dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str | torch.device,
    state_bytes: int = 0,
) -> tuple[HybridLM, str]:
    """Instantiate the model on the meta device and load its tensors one at a time onto `device` in `dtype`,
    checking every name and shape (and, on a GPU, that weights + `state_bytes` fit first). Returns the model and the
    checkpoint's fingerprint (taken before the dtype cast)."""
    device = torch.device(device)
    if isinstance(tensors, dict):
        tensors = InMemory(tensors)
    model = meta_model(cfg)
    expected = model.state_dict()
    names = list(tensors.keys())
    if any(n.startswith("model.visual.") for n in names):
        log.warning("this checkpoint's vision tower is ignored: deltamem runs its text model")
    sources = canonical_sources(names, cfg)
    if cfg.tie_word_embeddings:
        sources.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    weights = sum(v.numel() for v in expected.values()) * dtype.itemsize
    check_fits(device, weights + state_bytes, f"this model in {str(dtype).removeprefix('torch.')}")
    fp = Fingerprint(cfg)
    loaded: dict[str, torch.Tensor] = {}  # already on the device in the model's dtype: the parameters themselves
    for k in sorted(expected):
        parts = [tensors.get(n) for n in sources[k].names]
        t = sources[k].join(parts)
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, config implies {tuple(expected[k].shape)}")
        fp.add(k, t)
        if tensors.owned:
            t = t.to(device=device, dtype=dtype)
        else:  # from the file's pages into place: no intermediate copy in the file's dtype
            t = torch.empty(t.shape, dtype=dtype, device=device).copy_(t)
        loaded[k] = t
        del parts, t
    model.load_state_dict(loaded, strict=True, assign=True)  # once: per tensor it walked the module tree each time
    return model.eval(), fp.hexdigest()

"""scripts/distill.py's models: the teacher (SmolLM2's GGUF, or a random Llama for --tiny / --smoke) and its tokenizer,
the student converted from it (model/distilled.py) with low-rank updates of its MLPs, and the mapping between the
student's parameters and the delta file's tensors."""

from __future__ import annotations

import math

import torch

from deltamem.model import distilled
from deltamem.model.config import ModelConfig
from deltamem.model.layers import HybridLM

SINK, WINDOW = 4, 1024  # the bounded attention the student trains and runs with
EOT = 0  # <|endoftext|>: separates documents


SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 8192,
}


def load_teacher(args) -> tuple[dict, dict[str, torch.Tensor]]:
    if args.tiny or args.smoke:  # random weights: a small Llama for the CPU pipeline test, or SmolLM2's shapes
        hf = dict(SMOLLM2)
        if args.tiny:
            hf.update(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=8,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            )
        torch.manual_seed(0)
        with torch.device("cpu"):
            m = HybridLM(ModelConfig.from_hf(hf))
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        return hf, m.state_dict()
    from deltamem.model.gguf_file import read_gguf, smollm2_gguf

    return read_gguf(args.gguf or smollm2_gguf())


def tokenizer(args):
    from deltamem.model.tokenizer import Tokenizer

    if args.gguf:
        return Tokenizer.from_gguf(args.gguf)
    from deltamem.model.gguf_file import smollm2_gguf

    return Tokenizer.from_gguf(smollm2_gguf())


class LowRank(torch.nn.Module):
    """A Linear weight's low-rank update as a parametrization: W + B A, with A [r, in] random (scaled to keep
    A x near x's size) and B [out, r] zero, so training starts from W itself."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        super().__init__()
        out_f, in_f = weight.shape
        self.a = torch.nn.Parameter(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
        self.b = torch.nn.Parameter(torch.zeros(out_f, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.b @ self.a).to(w.dtype)


LORA_PARAM = ".parametrizations.weight.0."  # a LowRank's factors: NAME + LORA_PARAM + "a" / "b"


def add_lora(student: HybridLM, cfg, rank: int) -> None:
    from torch.nn.utils import parametrize

    gen = torch.Generator().manual_seed(1)
    for name in distilled.lora_targets(cfg):
        lin = student.get_submodule(name)
        parametrize.register_parametrization(lin, "weight", LowRank(lin.weight, rank, gen))


def delta_name(n: str) -> str:
    """A student parameter's name in the delta file (LowRank factors become NAME.lora_a / NAME.lora_b)."""
    return n.replace(LORA_PARAM, ".lora_") if LORA_PARAM in n else n


def build_models(args, device, train: bool = True):
    """(teacher, student, student config, trainable parameters by delta name). For training the student gets the
    LowRank updates (--lora-rank) and only the distilled tensors require grad; for evaluation it is plain."""
    hf, teacher_sd = load_teacher(args)
    tcfg = ModelConfig.from_hf(hf)
    scfg = ModelConfig.from_hf(distilled.hybrid_config(hf))
    teacher = HybridLM(tcfg)
    teacher.load_state_dict(teacher_sd)
    student = HybridLM(scfg)
    student.load_state_dict(distilled.convert(teacher_sd, scfg))
    if train and args.lora_rank:
        add_lora(student, scfg, args.lora_rank)
    teacher = teacher.to(device=device, dtype=args.dtype).eval().requires_grad_(False)
    student = student.to(device)
    named = dict(student.named_parameters())
    dense = distilled.changed(named, scfg, attention=train and args.attn_lr_scale > 0)
    trainable = {delta_name(n): p for n, p in named.items() if n in dense or (train and LORA_PARAM in n)}
    for n, p in named.items():
        p.requires_grad_(delta_name(n) in trainable)
        if delta_name(n) not in trainable:  # frozen weights in the compute dtype; trained ones stay float32 masters
            p.data = p.data.to(args.dtype)
    return teacher, student, scfg, trainable


def load_into(student: HybridLM, delta: dict[str, torch.Tensor], device) -> None:
    """Put a delta's tensors into a training student (LowRank factors into its parametrizations)."""
    params = dict(student.named_parameters())
    names = {delta_name(n): n for n in params}
    for k, v in delta.items():
        if k.endswith(".lora_a") and (k not in names or params[names[k]].shape != v.shape):
            have = params[names[k]].shape[0] if k in names else 0
            raise SystemExit(
                f"the delta's low-rank updates have rank {v.shape[0]}, this student's {have}: "
                f"give --lora-rank {v.shape[0]}"
            )
    student.load_state_dict({names.get(k, k): v.to(device) for k, v in delta.items()}, strict=False)

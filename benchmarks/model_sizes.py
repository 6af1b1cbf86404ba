"""Sizes a user needs to choose a model, from config shapes alone (model/sizes.py; the same figures as
`deltamem info --model DIR` on a folder with only config.json): Qwen3.5 0.8B/2B/4B/9B and OLMo Hybrid 7B, bf16,
the default window 4096 + 4 sink tokens. Shapes from the released config.json files.

    python benchmarks/model_sizes.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import olmo_hybrid_7b_config

from deltamem.model.config import ModelConfig
from deltamem.model.sizes import model_sizes


def qwen35(hidden: int, inter: int, layers: int, heads: int, kv: int, lin_v: int, tied: bool) -> dict:
    return {
        "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": lin_v, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "tie_word_embeddings": tied,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    }


MODELS = {
    "Qwen3.5-0.8B": qwen35(1024, 3584, 24, 8, 2, 16, True),
    "Qwen3.5-2B": qwen35(2048, 6144, 24, 8, 2, 16, True),
    "Qwen3.5-4B": qwen35(2560, 9216, 32, 16, 4, 32, True),
    "Qwen3.5-9B": qwen35(4096, 12288, 32, 16, 4, 32, False),
    "OLMo-Hybrid-7B": olmo_hybrid_7b_config(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    rows = {name: model_sizes(ModelConfig.from_hf(hf), 4096, 4, torch.bfloat16) for name, hf in MODELS.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_sizes.json").write_text(json.dumps(rows, indent=2) + "\n")
    mb, gb = 1e6, 1 << 30
    lines = [
        "| model | parameters | weights (bf16) | state per session | bytes per 200-token turn | GPU memory (bf16) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s['parameters'] / 1e9:.2f} B | {s['weight_bytes'] / gb:.1f} GiB "
            f"| {s['state_bytes'] / mb:.0f} MB | {s['turn_bytes'] / mb:.0f} MB | {s['gpu_bytes'] / gb:.1f} GiB |"
        )
    text = (
        "# Model sizes\n\n`python benchmarks/model_sizes.py` (text model only; window 4096 + 4 sink tokens; the GPU "
        "figure is weights + state + 1 GiB of headroom). A turn rewrites every recurrent state and at most two KV "
        "pages per attention layer; the store keeps unchanged pages once.\n\n" + "\n".join(lines) + "\n"
    )
    (args.out / "model_sizes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

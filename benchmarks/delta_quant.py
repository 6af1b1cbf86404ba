"""How the default model's 64 MB could be spent: perplexity of the shipped student with its DeltaNet mixers'
matrices re-quantised more coarsely (int4 with a scale per group of columns) against the shipped int8, next to the
teacher, on 4 x 2048 tokens of standard-library source (part of the training corpus: a relative measure, not the
held-out evaluation of benchmarks/default_model.py). CPU, fp32, the student with its 4 + 1024 window.

    python benchmarks/delta_quant.py      # -> benchmarks/results/delta_quant.{json,md}
"""

from __future__ import annotations

import math

import torch
from common import corpus_text, versions, write_results

from deltamem.model import distilled
from deltamem.model.config import ModelConfig
from deltamem.model.gguf_file import read_gguf, smollm2_gguf
from deltamem.model.layers import HybridLM
from deltamem.model.tokenizer import Tokenizer
from deltamem.model.train import hidden_states, logits


def perplexity(sd: dict, cfg: ModelConfig, ids: torch.Tensor, window: int | None) -> float:
    model = HybridLM(cfg)
    model.load_state_dict(sd)
    nll = 0.0
    for row in ids:
        lp = logits(model, hidden_states(model, row[None], window=window))[0, :-1].log_softmax(-1)
        nll -= float(lp.gather(-1, row[1:, None]).sum())
    return math.exp(nll / (ids.numel() - len(ids)))


def int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Symmetric int4 (-7..7) with one scale per `group` columns of each row, dequantised."""
    g = w.view(w.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7
    return ((g / scale).round().clamp(-7, 7) * scale).view_as(w)


@torch.no_grad()
def main() -> None:
    path = smollm2_gguf()
    tok = Tokenizer.from_gguf(path)
    ids = torch.tensor(tok.encode(corpus_text(200_000))[: 4 * 2048]).view(4, 2048)
    hf, base = read_gguf(path)
    cfg = ModelConfig.from_hf(distilled.hybrid_config(hf))
    delta, meta = distilled.load_delta()
    student = {k: v for k, v in distilled.convert(base, cfg).items()}
    mats = [v for k, v in delta.items() if ".linear_attn." in k and v.dim() == 2 and v.numel() >= 1 << 14]
    weights, rows_ = sum(v.numel() for v in mats), sum(v.shape[0] for v in mats)
    rows = [{"model": "teacher (full attention)", "ppl": perplexity(base, ModelConfig.from_hf(hf), ids, None)}]
    for name, group in (
        ("student, mixers int8 per row (shipped)", None),
        ("mixers int4 / 32", 32),
        ("mixers int4 / 64", 64),
    ):
        d = (
            delta
            if group is None
            else {
                k: int4(v, group) if ".linear_attn." in k and v.dim() == 2 and v.numel() >= 1 << 14 else v
                for k, v in delta.items()
            }
        )
        ppl = perplexity(distilled.apply_delta(student, d), cfg, ids, 1024)
        # int8: a byte a weight + a float32 scale a row; int4: half a byte + a float16 scale a group
        mb = (weights + 4 * rows_) / 1e6 if group is None else weights * (0.5 + 2 / group) / 1e6
        rows.append({"model": name, "ppl": ppl, "mixer MB": mb})
    for r in rows:
        r["vs teacher"] = r["ppl"] / rows[0]["ppl"]
    write_results(
        "delta_quant",
        rows,
        "Default model: DeltaNet mixers at int8 vs int4 (stdlib text, CPU)",
        ["model", "ppl", "vs teacher", "mixer MB"],
        versions=versions(),
        tokens=ids.numel(),
        delta_meta=meta,
        command="python benchmarks/delta_quant.py",
    )
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()

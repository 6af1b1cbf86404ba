"""The batched training forward (model/train.py) against the engine, and the default model's conversion and delta
format (model/distilled.py). The engine is itself pinned to transformers (tests/model/test_parity.py), so agreeing
with it means the distilled student trains on the function it will run as."""

from __future__ import annotations

import pytest
import torch

from deltamem.model import distilled
from deltamem.model.config import ModelConfig
from deltamem.model.engine import Engine
from deltamem.model.layers import HybridLM
from deltamem.model.train import hidden_states, logits

LLAMA = {
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 8,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
OLMO = {
    "model_type": "olmo_hybrid",
    "vocab_size": 300,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": None},
}


def _student(hf: dict, seed: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A converted Llama (or a random OLMo Hybrid) with every weight random, gates and decays included."""
    gen = torch.Generator().manual_seed(seed)
    if hf["model_type"] == "llama":
        cfg = ModelConfig.from_hf(hf)
        teacher = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in HybridLM(cfg).state_dict().items()}
        cfg = ModelConfig.from_hf(distilled.hybrid_config(hf))
        sd = distilled.convert(teacher, cfg)
    else:
        cfg = ModelConfig.from_hf(hf)
        sd = dict(HybridLM(cfg).state_dict())
    for k, v in sd.items():  # randomise the initialised parts too, so nothing sits at a special value
        if not k.endswith(("A_log", "dt_bias")):
            sd[k] = v + torch.randn(v.shape, generator=gen) * 0.1
    return cfg, sd


@pytest.mark.parametrize("hf", [LLAMA, OLMO], ids=["llama-hybrid-rope", "olmo-hybrid-nope"])
@pytest.mark.parametrize("window", [None, 8])
def test_training_forward_matches_engine(hf, window):
    cfg, sd = _student(hf, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(4))
    trained = HybridLM(cfg)
    trained.load_state_dict(sd)
    with torch.no_grad():
        got = logits(trained, hidden_states(trained, ids, window=window, sink=2))
    for row in range(2):
        served = HybridLM(cfg)
        served.load_state_dict(sd)
        engine = Engine(served, window=window, sink=2, prefill_chunk=7)  # chunks cross evictions
        want = engine.feed(ids[row])
        torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)


def test_training_forward_is_differentiable_in_the_new_parts():
    cfg, sd = _student(LLAMA, seed=5)
    model = HybridLM(cfg)
    model.load_state_dict(sd)
    out = logits(model, hidden_states(model, torch.randint(0, 300, (1, 30)), window=8, sink=2))
    out.square().mean().backward()
    for name, p in distilled.changed(dict(model.named_parameters()), cfg).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_forward_takes_another_chunk_op():
    """chunk_op swaps the DeltaNet op (scripts/distill.py --chunk-op): with the token-by-token recurrent form,
    an independent formulation, the logits and the gradients match the default chunked reference's."""
    from deltamem.kernels import reference

    cfg, sd = _student(LLAMA, seed=6)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    calls = []

    def recurrent(q, k, v, g, beta):
        calls.append(q.shape)
        return reference.recurrent_gated_delta_rule(q, k, v, g, beta)

    outs, grads = [], []
    for op in (None, recurrent):
        model = HybridLM(cfg)
        model.load_state_dict(sd)
        out = logits(model, hidden_states(model, ids, window=8, sink=2, chunk_op=op))
        out.square().mean().backward()
        outs.append(out)
        grads.append(model.model.layers[0].linear_attn.q_proj.weight.grad)
    assert len(calls) == len(distilled.converted_layers(cfg))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)


def test_conversion_reuses_attention_weights_per_query_head():
    cfg = ModelConfig.from_hf(LLAMA)
    teacher = {k: torch.randn(v.shape) for k, v in HybridLM(cfg).state_dict().items()}
    scfg = ModelConfig.from_hf(distilled.hybrid_config(LLAMA))
    assert scfg.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]
    sd = distilled.convert(teacher, scfg)
    model = HybridLM(scfg)
    model.load_state_dict(sd)  # every name and shape
    rep, hd = 6 // 2, 8
    k = teacher["model.layers.1.self_attn.k_proj.weight"].view(2, hd, -1)
    new_k = sd["model.layers.1.linear_attn.k_proj.weight"].view(6, hd, -1)
    for head in range(6):  # query head h read key/value head h // rep in the teacher (transformers' repeat_kv)
        assert torch.equal(new_k[head], k[head // rep])
    assert torch.equal(sd["model.layers.3.self_attn.q_proj.weight"], teacher["model.layers.3.self_attn.q_proj.weight"])
    assert not any(k.startswith("model.layers.0.self_attn.") for k in sd)


def test_delta_round_trip_within_int8_rounding(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(300, 400, generator=gen), "b.A_log": torch.randn(9, generator=gen)}
    path = tmp_path / "d.safetensors"
    distilled.save_delta(tensors, path, {"window": "1024"})
    back, meta = distilled.load_delta(path)
    assert meta["window"] == "1024"
    assert torch.equal(back["b.A_log"], tensors["b.A_log"])
    bound = tensors["a.weight"].abs().amax(1, keepdim=True) / 254 + 1e-7  # half a step of absmax / 127
    assert ((back["a.weight"] - tensors["a.weight"]).abs() <= bound).all()
    assert path.stat().st_size < 300 * 400 * 1.1  # one byte a weight


@pytest.mark.parametrize("t", [20, 37, 48, 64])  # within 2 windows, ragged, whole windows, and more
def test_banded_attention_matches_a_dense_mask(t):
    """The block-wise sink + window attention against one attention call with the dense [T, T] mask: outputs
    and the gradients of q, k and v."""
    from deltamem.kernels.window import visible
    from deltamem.model.train import _banded_attention

    sink, window = 3, 16
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, 3, t, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    up = torch.randn(2, 3, t, 8, generator=gen, dtype=torch.float64)
    pos = torch.arange(t)
    j, p = pos[None, :], pos[:, None]
    dense = visible(j, p, sink, window)
    outs = [
        _banded_attention(q, k, v, sink, window, 0.3),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.3),
    ]
    grads = [torch.autograd.grad((o * up).sum(), (q, k, v)) for o in outs]
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_apply_delta_adds_low_rank_updates_and_refuses_broken_ones():
    from deltamem.model.errors import CheckpointError

    gen = torch.Generator().manual_seed(0)
    w, b, a = torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen), torch.randn(2, 4, generator=gen)
    out = distilled.apply_delta(
        {"x.weight": w, "y": torch.zeros(2)}, {"x.lora_a": a, "x.lora_b": b, "y": torch.ones(2)}
    )
    torch.testing.assert_close(out["x.weight"], w + b @ a)
    assert torch.equal(out["y"], torch.ones(2)) and "x.lora_a" not in out
    for broken in ({"x.lora_b": b}, {"x.lora_a": a}, {"x.lora_a": a, "x.lora_b": torch.randn(3, 3)}):
        with pytest.raises(CheckpointError, match="low-rank update"):
            distilled.apply_delta({"x.weight": w}, broken)

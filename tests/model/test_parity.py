"""Invariant 1: logits equal transformers' on tiny random OLMo Hybrid and Llama checkpoints (fp32, window=None)."""

import pytest
import torch

from deltamem.model import load_model
from tests.model.hf_models import LLAMA_SHAPES, OLMO_SHAPES, make_llama, make_olmo_hybrid


@pytest.mark.parametrize("name", sorted(OLMO_SHAPES))
def test_olmo_hybrid_matches_transformers(tmp_path, name):
    ref = make_olmo_hybrid(tmp_path, **OLMO_SHAPES[name])
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    eng = load_model(tmp_path)
    assert eng.config.layer_types == ref.config.layer_types
    got = eng.feed(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("name", sorted(LLAMA_SHAPES))
def test_llama_matches_transformers(tmp_path, name):
    ref = make_llama(tmp_path, **LLAMA_SHAPES[name])
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = load_model(tmp_path).feed(ids)
    assert (got - want).abs().max() < 1e-4


def test_decode_matches_transformers_cache(tmp_path):
    """Token-by-token decoding against transformers' own cached decoding (its recurrent-step path)."""
    ref = make_olmo_hybrid(tmp_path, **OLMO_SHAPES["olmo_gqa_rope"])
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ref(ids[None, :30], use_cache=True)
        cache, want = out.past_key_values, [out.logits[0, -1]]
        for t in range(30, 40):
            out = ref(ids[None, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            want.append(out.logits[0, -1])
    eng = load_model(tmp_path)
    got = [eng.feed(ids[:30])[-1]] + [eng.feed(ids[t : t + 1])[-1] for t in range(30, 40)]
    assert (torch.stack(got) - torch.stack(want)).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    """bf16/fp16 safetensors load (upcast to fp32 here) and match the reference upcast the same way."""
    from transformers import AutoModelForCausalLM

    make_olmo_hybrid(tmp_path, dtype=dtype, **OLMO_SHAPES["olmo_gqa_rope"])
    # Reload rather than cast the in-memory model: casting would round its rotary inv_freq buffer too.
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (64,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = load_model(tmp_path).feed(ids)
    assert (got - want).abs().max() < 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    """A checkpoint saved in shards (model.safetensors.index.json) loads the same as one file."""
    ref = make_olmo_hybrid(tmp_path / "one", **OLMO_SHAPES["olmo_odd_nope"])
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    ids = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    eng = load_model(tmp_path / "sharded")
    assert (eng.feed(ids) - want).abs().max() < 1e-4
    assert eng.fingerprint == load_model(tmp_path / "one").fingerprint  # same weights, same identity


def test_bad_checkpoints_are_refused(tmp_path):
    from deltamem.model import CheckpointError

    make_llama(tmp_path, **LLAMA_SHAPES["llama_gqa"])
    with pytest.raises(CheckpointError, match="no model at"):
        load_model(tmp_path / "missing")
    cfg = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg.replace('"num_hidden_layers": 3', '"num_hidden_layers": 4'))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(cfg.replace('"llama"', '"gpt2"'))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(cfg)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(tmp_path)

"""model.gguf_file against transformers' own GGUF loader (SmolLM2-135M Q4_1/Q8_0), plus tiny synthetic files
written with gguf.GGUFWriter for the layouts and refusals the shipped file cannot exercise."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from deltamem.model.errors import CheckpointError
from deltamem.model.gguf_file import read_gguf, smollm2_gguf


def _smol_path() -> Path:
    return smollm2_gguf()  # `make test` installs it; a missing file fails here rather than skipping


@pytest.fixture(scope="module")
def smol():
    """(path, our config, our state dict, transformers' model) loaded once for the module."""
    import transformers
    path = _smol_path()
    cfg, sd = read_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return path, cfg, sd, ref.eval()


def test_state_dict_matches_transformers(smol):
    _, cfg, sd, ref = smol
    theirs = ref.state_dict()
    assert cfg["tie_word_embeddings"] and "lm_head.weight" not in sd
    # transformers ties lm_head to the embeddings and lists it; we leave it out, as a tied HF checkpoint does.
    assert set(sd) == set(theirs) - {"lm_head.weight"}
    assert torch.equal(theirs["lm_head.weight"], sd["model.embed_tokens.weight"])
    for name, t in sd.items():
        assert t.dtype == torch.float32 and t.is_contiguous(), name
        assert t.shape == theirs[name].shape, name
        if not torch.equal(t, theirs[name]):  # both use gguf's dequantize, so exact is expected; allow 1e-6
            diff = (t - theirs[name]).abs().max().item()
            assert diff <= 1e-6, f"{name}: max abs diff {diff}"


def test_config_matches_transformers(smol):
    _, cfg, _, ref = smol
    rc = ref.config
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
        "mlp_bias",
        "hidden_act",
    ):
        assert cfg[key] == getattr(rc, key), key
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": rc.rope_parameters["rope_theta"]}
    assert cfg["rope_theta"] == rc.rope_parameters["rope_theta"] == 100000.0


def test_config_dict_builds_an_equivalent_llama(smol):
    """Our config + state dict, fed to transformers' LlamaForCausalLM, give the same logits as its GGUF load:
    checks the config means what the file means (rope, eps, GQA), not just that the fields are present."""
    import transformers
    from accelerate import init_empty_weights

    _, cfg, sd, ref = smol
    hf_cfg = {k: v for k, v in cfg.items() if k != "architectures"}
    with init_empty_weights():  # parameters on meta (no random init to pay for), buffers real
        ours = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    result = ours.load_state_dict(sd, strict=False, assign=True)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    ours.tie_weights()  # tied config: lm_head must be the embedding we just assigned
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_text_file_is_refused(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        read_gguf(bad)
    assert "notes.gguf" in str(e.value)


@pytest.mark.parametrize("size", [1 << 20, 50 << 20], ids=["header", "tensor-data"])
def test_truncated_file_is_refused(tmp_path, size):
    cut = tmp_path / "cut.gguf"
    with open(_smol_path(), "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        read_gguf(cut)
    assert "cut.gguf" in str(e.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.gguf"):
        read_gguf(tmp_path / "nothere.gguf")


# --- tiny synthetic files -------------------------------------------------------------------------------

H, FF, V, NH, NKV, HD, L = 16, 24, 40, 4, 2, 4, 2


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, written from its definition (independent of our inverse)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not tied:
        w["lm_head.weight"] = (V, H)
    for n in range(L):
        p = f"model.layers.{n}."
        w |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (NH * HD, H),
            p + "self_attn.k_proj.weight": (NKV * HD, H),
            p + "self_attn.v_proj.weight": (NKV * HD, H),
            p + "self_attn.o_proj.weight": (H, NH * HD),
            p + "mlp.gate_proj.weight": (FF, H),
            p + "mlp.up_proj.weight": (FF, H),
            p + "mlp.down_proj.weight": (H, FF),
        }
    return {k: g.standard_normal(s).astype(np.float32) for k, s in w.items()}


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "model.layers.": "blk.",
}


def _write(path: Path, weights: dict[str, np.ndarray], arch: str = "llama", f16: bool = False) -> Path:
    """A GGUF the way convert_hf_to_gguf writes a Llama: GGUF names, q/k rows permuted for rotary."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HD)
    w.add_bos_token_id(7)
    w.add_eos_token_id(8)
    for name, arr in weights.items():
        if name.endswith("q_proj.weight"):
            arr = _llama_cpp_permute(arr, NH)
        elif name.endswith("k_proj.weight"):
            arr = _llama_cpp_permute(arr, NKV)
        for a, b in _TO_GGUF.items():
            name = name.replace(a, b)
        w.add_tensor(name, arr.astype(np.float16) if f16 and arr.ndim == 2 else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("f16", [False, True])
def test_synthetic_round_trip(tmp_path, tied, f16):
    hf = _hf_weights(tied)
    cfg, sd = read_gguf(str(_write(tmp_path / "tiny.gguf", hf, f16=f16)))  # str or Path
    assert set(sd) == set(hf)
    for k, v in hf.items():
        want = torch.from_numpy(v.astype(np.float16).astype(np.float32) if f16 and v.ndim == 2 else v)
        assert torch.equal(sd[k], want), k
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (NKV, HD, V)
    assert (cfg["rope_theta"], cfg["bos_token_id"], cfg["eos_token_id"]) == (500000.0, 7, 8)


def test_other_architecture_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'qwen2'.*reads 'llama' and qwen35"):
        read_gguf(_write(tmp_path / "q.gguf", _hf_weights(True), arch="qwen2"))


def test_missing_tensor_is_refused(tmp_path):
    hf = _hf_weights(True)
    del hf["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(CheckpointError, match=r"lacks tensors for model\.layers\.1\.mlp\.down_proj\.weight"):
        read_gguf(_write(tmp_path / "m.gguf", hf))


def test_undequantisable_type_is_refused(tmp_path):
    hf = _hf_weights(True)
    hf["model.layers.0.mlp.up_proj.weight"] = hf["model.layers.0.mlp.up_proj.weight"].astype(np.float64)
    with pytest.raises(CheckpointError, match="blk.0.ffn_up.weight has type F64"):
        read_gguf(_write(tmp_path / "f64.gguf", hf))


@pytest.mark.parametrize(
    "extra, message",
    [
        ("rope_freqs.weight", "llama3 rope scaling"),
        ("model.layers.0.self_attn.q_proj.bias", "does not use: blk.0.attn_q.bias"),
    ],
)
def test_unusable_tensor_is_refused(tmp_path, extra, message):
    """Loading these while ignoring them would give a model that runs but computes something else."""
    hf = _hf_weights(True)
    hf[extra] = np.ones(NH * HD, dtype=np.float32)
    with pytest.raises(CheckpointError, match=message):
        read_gguf(_write(tmp_path / "x.gguf", hf))


def test_engine_logits_and_greedy_output_match_transformers(smol):
    """The engine on SmolLM2's GGUF (our loader, tokenizer, cache, generate) vs transformers on the same file:
    logits within fp32 tolerance, and the same greedy continuation of chat prompts."""
    from deltamem.model import load_model

    path, _, _, ref = smol
    eng = load_model(path)
    tok = eng.tokenizer
    ids = torch.tensor(tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert (eng.feed(ids) - want).abs().max() < 1e-4
    for question in ("What is the capital of France?", "Write a haiku about memory."):
        eng.reset()
        prompt = tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):]
        text = "".join(eng.generate(prompt, max_new_tokens=20))
        assert eng.generated == out.tolist()[: len(eng.generated)]
        assert text == tok.decode(out.tolist()).split("<|im_end|>")[0]

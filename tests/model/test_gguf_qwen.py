"""llama.cpp's qwen35 / qwen35moe / qwen3next GGUF files: written from tiny random transformers models in the
converter's layout (tests/model/gguf_qwen_writer.py), loaded, logits compared with transformers (and with the
safetensors load), at F32, Q8_0 and the K-quants people download."""

import pytest
import torch

from deltamem.model import load_model
from tests.model.gguf_qwen_writer import write_qwen_gguf
from tests.model.hf_models import QWEN_SHAPES, make_qwen


def _ids(n=90, seed=3):
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["qwen3_5_gqa", "qwen3_5_moe", "qwen3_5_multimodal", "qwen3_next"])
def test_f32_gguf_matches_transformers_and_the_safetensors_load(tmp_path, name):
    family, kw = QWEN_SHAPES[name]
    if name == "qwen3_next":
        kw = dict(kw, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)  # llama.cpp's qwen3next
    ref = make_qwen(tmp_path / "hf", family, **kw)
    write_qwen_gguf(ref, tmp_path / "m.gguf")
    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
    eng = load_model(tmp_path / "m.gguf", window=None)
    got = eng.feed(ids)
    assert (got - want).abs().max() < 1e-4
    assert (got - load_model(tmp_path / "hf", window=None).feed(ids)).abs().max() < 1e-4
    assert eng.tokenizer is None  # no vocabulary in these files: ids in, logits out


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_quantized_gguf_dequantises_at_load(tmp_path, kind):
    """Row length 256 (the K-quants' block): the quantized tensors decode to what transformers is given."""
    family, kw = QWEN_SHAPES["qwen3_5_gqa"]
    kw = dict(kw, hidden_size=256, intermediate_size=96)
    ref = make_qwen(tmp_path / "hf", family, **kw)
    quant = {
        n: kind
        for n in (
            "token_embd.weight",
            "output.weight",
            "blk.3.attn_q.weight",
            "blk.3.attn_k.weight",
            "blk.3.attn_v.weight",
            "blk.0.ffn_gate.weight",
            "blk.1.ffn_up.weight",
        )
    }
    write_qwen_gguf(ref, tmp_path / "m.gguf", quant)
    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
    got = load_model(tmp_path / "m.gguf", window=None).feed(ids)
    assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())
    import gguf

    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type.name for t in reader.tensors if t.name in quant} == {kind}


def test_multi_token_prediction_blocks_are_ignored_and_bad_files_refused(tmp_path):
    import gguf

    from deltamem.model import CheckpointError

    family, kw = QWEN_SHAPES["qwen3_5_gqa"]
    write_qwen_gguf(make_qwen(tmp_path / "hf", family, **kw), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "qwen35")
    for f in reader.fields.values():
        if f.name.startswith("qwen35.") and f.name != "qwen35.ssm.group_count":
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="ssm.group_count"):
        load_model(tmp_path / "bad.gguf")

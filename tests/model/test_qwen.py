"""Qwen3.5 (dense, MoE, the multimodal wrapper) and Qwen3-Next: logits and cached decoding equal transformers' on
tiny random checkpoints (fp32, window=None), and the engine's invariants hold for each family."""

import pytest
import torch

from deltamem.model import load_model
from tests.model.hf_models import QWEN_SHAPES, make_qwen


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(QWEN_SHAPES))
def test_qwen_logits_match_transformers(tmp_path, name):
    family, kw = QWEN_SHAPES[name]
    ref = make_qwen(tmp_path, family, **kw)
    ids = _ids(150, 2)  # over two of transformers' 64-token chunks, and ours
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
    eng = load_model(tmp_path, window=None)
    text = ref.config.get_text_config()
    assert eng.config.layer_types == list(text.layer_types)
    got = eng.feed(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["qwen3_5_gqa", "qwen3_next"])
def test_qwen_cached_decode_matches_transformers(tmp_path, name):
    """Token by token against transformers' own cached decoding (its recurrent-step path)."""
    family, kw = QWEN_SHAPES[name]
    ref = make_qwen(tmp_path, family, **kw)
    ids = _ids(40, 4)
    with torch.no_grad():
        out = ref(input_ids=ids[None, :30], use_cache=True)
        cache, want = out.past_key_values, [out.logits[0, -1]]
        for t in range(30, 40):
            out = ref(input_ids=ids[None, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            want.append(out.logits[0, -1])
    eng = load_model(tmp_path, window=None)
    got = [eng.feed(ids[:30])[-1]] + [eng.feed(ids[t : t + 1])[-1] for t in range(30, 40)]
    assert (torch.stack(got) - torch.stack(want)).abs().max() < 1e-4


def test_qwen_bf16_checkpoint_loads(tmp_path):
    """A bfloat16 checkpoint (as released) loads and matches transformers reading the same file in float32."""
    from transformers import AutoModelForCausalLM

    family, kw = QWEN_SHAPES["qwen3_5_moe"]
    make_qwen(tmp_path, family, dtype=torch.bfloat16, **kw)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(64, 5)
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0]
    assert (load_model(tmp_path, window=None).feed(ids) - want).abs().max() < 1e-4


def test_multimodal_checkpoint_says_the_vision_tower_is_ignored(tmp_path, caplog):
    family, kw = QWEN_SHAPES["qwen3_5_multimodal"]
    make_qwen(tmp_path, family, **kw)
    with caplog.at_level("WARNING"):
        load_model(tmp_path)
    assert sum("vision tower is ignored" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("name", ["qwen3_5_gqa", "qwen3_5_moe", "qwen3_next"])
def test_qwen_chunking_and_window_invariants(tmp_path, name):
    """Invariant 2 (results do not depend on how the stream is cut into feeds or prefill chunks) and a bounded
    window's flat state, for the Qwen families; the windowed run equals full attention until the window fills."""
    family, kw = QWEN_SHAPES[name]
    make_qwen(tmp_path, family, **kw)
    ids = _ids(300, 7)
    whole = load_model(tmp_path, window=64, prefill_chunk=512).feed(ids)
    eng = load_model(tmp_path, window=64, prefill_chunk=37)
    cuts = [0, 1, 50, 51, 130, 300]
    pieces = torch.cat([eng.feed(ids[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)])
    assert (pieces - whole).abs().max() < 1e-4
    full = load_model(tmp_path, window=None).feed(ids)
    assert (whole[:68] - full[:68]).abs().max() < 1e-4  # 4 sink + 64 window slots: nothing evicted yet
    assert (whole[-1] - full[-1]).abs().max() > 1e-3  # and the window does bound what is seen after that
    size = len(eng.snapshot())
    eng.feed(_ids(200, 8))
    assert len(eng.snapshot()) == size  # constant-size state


@pytest.mark.parametrize("name", ["qwen3_5_gqa", "qwen3_5_moe", "qwen3_next"])
def test_qwen_snapshot_restores_in_a_new_process(tmp_path, name):
    """Invariant 3 for each Qwen family: a snapshot restored by another process continues exactly."""
    import subprocess
    import sys

    family, kw = QWEN_SHAPES[name]
    make_qwen(tmp_path / "m", family, **kw)
    eng = load_model(tmp_path / "m", window=64)
    eng.feed(_ids(200, 9))
    (tmp_path / "s.bin").write_bytes(eng.snapshot())
    want = eng.feed(_ids(20, 10))
    torch.save(want, tmp_path / "want.pt")
    code = f"""
import torch
from deltamem.model import load_model
eng = load_model({str(tmp_path / 'm')!r}, window=64)
eng.restore(open({str(tmp_path / 's.bin')!r}, 'rb').read())
got = eng.feed(torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(10)))
want = torch.load({str(tmp_path / 'want.pt')!r})
assert torch.equal(got, want), (got - want).abs().max()
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_qwen35_tokenizer_splits_as_hf_tokenizers_does(tmp_path):
    """A tokenizer in Qwen3.5's layout, read from tokenizer.json and from a GGUF (pre-tokenizer qwen35), encodes as
    the tokenizers library does, combining marks included (Qwen3.5's split keeps them with their letters)."""
    from tokenizers import Tokenizer as HF

    from deltamem.model.tokenizer import Tokenizer
    from tests.model.gguf_qwen_writer import write_qwen_gguf
    from tests.model.hf_models import save_qwen_tokenizer

    family, kw = QWEN_SHAPES["qwen3_5_gqa"]
    ref = make_qwen(tmp_path, family, **kw)
    tokens, merges = save_qwen_tokenizer(tmp_path, "{{ messages }}")
    write_qwen_gguf(ref, tmp_path / "m.gguf", tokens=tokens, merges=merges)
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))
    ours = [Tokenizer.from_tokenizer_json(tmp_path), Tokenizer.from_gguf(tmp_path / "m.gguf")]
    texts = ["cafe\u0301 na\u0308ive 12345 it's", "<|im_start|>user\nx = f(1)!!\n\n  y<|im_end|>", "\u0301 ;\u0301"]
    for text in texts:
        want = hf.encode(text).ids
        for tok in ours:
            assert tok.encode(text) == want, (text, tok.name)
            assert tok.decode(want) == text

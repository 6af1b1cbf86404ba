"""Invariants 2-4 (ARCHITECTURE.md) and the bounded window against an independent masked-attention reference."""

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deltamem.model import load_model
from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 320


@pytest.fixture(scope="module")
def olmo_dirs(tmp_path_factory):
    """Two tiny OLMo Hybrid checkpoints: one with rotary, one NoPE (as the released ones)."""
    out = {}
    for name in ("olmo_gqa_rope", "olmo_odd_nope"):
        d = tmp_path_factory.mktemp(name)
        make_olmo_hybrid(d, vocab=VOCAB, **OLMO_SHAPES[name])
        out[name] = d
    return out


def ids_of(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("name", ["olmo_gqa_rope", "olmo_odd_nope"])
def test_incremental_equals_whole(olmo_dirs, name, window):
    ids = ids_of(300, seed=1)
    whole = load_model(olmo_dirs[name], window=window, sink=4, prefill_chunk=1024).feed(ids)
    for splits in ([0, 7, 300], [0, 64, 65, 130, 300], list(range(0, 41)) + [300]):
        eng = load_model(olmo_dirs[name], window=window, sink=4, prefill_chunk=50)
        got = torch.cat([eng.feed(ids[a:b]) for a, b in zip(splits, splits[1:], strict=False)])
        torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)
    eng = load_model(olmo_dirs[name], window=window, sink=4)
    by_token = torch.cat([eng.feed(ids[i : i + 1]) for i in range(120)])
    torch.testing.assert_close(by_token, whole[:120], rtol=1e-4, atol=1e-4)


def test_window_matches_masked_attention_reference(olmo_dirs):
    """NoPE model, window 24 + 4 sinks: transformers' model with an explicit sink+band mask on its attention
    layers gives the same logits, so the ring buffer attends to exactly the tokens it should."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(olmo_dirs["olmo_odd_nope"], dtype=torch.float32).eval()
    t, w, s = 200, 24, 4
    p = torch.arange(t)
    allowed = (p[None, :] <= p[:, None]) & ((p[None, :] > p[:, None] - w) | (p[None, :] < s))
    mask = torch.zeros(t, t).masked_fill(~allowed, float("-inf"))[None, None]
    ids = ids_of(t, seed=2)
    with torch.no_grad():
        want = ref(ids[None], attention_mask={"full_attention": mask, "linear_attention": None}).logits[0]
    got = load_model(olmo_dirs["olmo_odd_nope"], window=w, sink=s, prefill_chunk=64).feed(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    full = load_model(olmo_dirs["olmo_odd_nope"]).feed(ids)
    assert (full[s + w :] - got[s + w :]).abs().max() > 1e-3  # the window really drops tokens


SCRIPT = textwrap.dedent(
    """
    import sqlite3, sys, torch
    torch.set_num_threads(2)
    from deltamem.model import load_model
    path, db, cont, out, window = sys.argv[1:6]
    eng = load_model(path, window=None if window == "None" else int(window), sink=4)
    blob = sqlite3.connect(db).execute("select blob from snaps order by rowid desc limit 1").fetchone()[0]
    eng.restore(blob)
    ids = torch.load(cont)
    torch.save({"logits": eng.feed(ids), "seen": eng.tokens_seen, "blob": eng.snapshot()}, out)
    """
)


@pytest.mark.parametrize("window", [None, 24])
def test_snapshot_restore_in_new_process_is_bit_identical(olmo_dirs, tmp_path, window):
    path = olmo_dirs["olmo_gqa_rope"]
    prefix, cont = ids_of(100, seed=3), ids_of(37, seed=4)
    a = load_model(path, window=window, sink=4)
    a.feed(prefix)
    want = a.feed(cont)

    b = load_model(path, window=window, sink=4)
    b.feed(prefix)
    db = tmp_path / "s.db"
    with sqlite3.connect(db) as con:
        con.execute("create table snaps (blob blob)")
        con.execute("insert into snaps values (?)", (b.snapshot(),))
    torch.save(cont, tmp_path / "cont.pt")
    # a bare environment but the test process's model options (DELTAMEM_*: load_model's defaults)
    options = {k: v for k, v in os.environ.items() if k.startswith("DELTAMEM_")}
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **options}
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), str(db), str(tmp_path / "cont.pt"), str(tmp_path / "o.pt"),
         str(window)],
        check=True, env=env, cwd=tmp_path, timeout=300,
    )
    got = torch.load(tmp_path / "o.pt")
    assert torch.equal(got["logits"], want)
    assert got["seen"] == 137 == a.tokens_seen
    assert got["blob"] == a.snapshot()  # the whole state, byte for byte


def test_state_is_bounded_with_a_window(olmo_dirs):
    eng = load_model(olmo_dirs["olmo_gqa_rope"], window=64, sink=4, prefill_chunk=1000)
    sizes = {}
    for target in (1000, 5000, 20000):
        eng.feed(ids_of(target - eng.tokens_seen, seed=target), logits="none")
        sizes[target] = (eng.state_bytes(), len(eng.snapshot()))
    assert len({s for s, _ in sizes.values()}) == 1, sizes
    blob_sizes = [b for _, b in sizes.values()]
    assert max(blob_sizes) - min(blob_sizes) < 64, sizes  # only the header's digits may differ
    unbounded = load_model(olmo_dirs["olmo_gqa_rope"], window=None)
    unbounded.feed(ids_of(1000), logits="none")
    small = unbounded.state_bytes()
    unbounded.feed(ids_of(4000), logits="none")
    assert unbounded.state_bytes() > small  # without a window the KV cache does grow

"""Incremental snapshots (Engine.snapshot_parts): after any sequence of feeds, decode steps, stops and restores, the
parts join to exactly the bytes a full snapshot() serialises from scratch, and only the tensors that changed were
copied and hashed again (an unchanged page keeps the very host buffer of the previous parts)."""

import pytest
import torch

from deltamem.memory.store import Store
from deltamem.model import load_model
from deltamem.model.cache import PAGE
from deltamem.model.generation import GRAPH_CHUNK
from deltamem.model.tokenizer import Tokenizer
from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid

VOCAB = 320
WINDOW, SINK = 2 * PAGE + 88, 4  # three pages per attention layer, the last one short


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmo")
    make_olmo_hybrid(d, vocab=VOCAB, **OLMO_SHAPES["olmo_gqa_rope"])
    return d


def ids(n, seed):
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def buffers(eng):
    """name -> the host tensor object holding that piece in the engine's piece cache."""
    return {n: t for n, (_, t) in eng._pieces.pieces.items()}


def check(eng):
    parts = eng.snapshot_parts()
    assert bytes(parts) == eng.snapshot()
    return parts


def kv_pages(eng):
    return sorted(n for n in eng._pieces.pieces if ".kv." in n)


def test_parts_equal_the_full_snapshot_and_only_touched_pages_are_copied(folder):
    eng = load_model(folder, window=WINDOW, sink=SINK, prefill_chunk=64)
    check(eng)  # the empty state
    eng.feed(ids(100, 0))
    check(eng)
    before = buffers(eng)
    eng.feed(ids(200, 1))  # positions 100..299: pages 0 and 1 of every attention layer
    check(eng)
    after = buffers(eng)
    pages = kv_pages(eng)
    assert len(pages) == 2 * 3  # two attention layers, three pages each
    for name in pages:
        same = after[name] is before[name]
        assert same == name.endswith(".00002"), name  # page 2 was not written to: not copied again
    for name in set(after) - set(pages):  # recurrent and conv states change with every token
        assert after[name] is not before[name]

    eng.feed(ids(WINDOW, 2))  # wraps the ring: every page
    check(eng)
    before = buffers(eng)
    eng.feed(ids(1, 3))  # one token: one ring slot
    check(eng)
    after = buffers(eng)
    slot = SINK + (eng.tokens_seen - 1 - SINK) % WINDOW
    for name in kv_pages(eng):
        assert (after[name] is before[name]) == (not name.endswith(f".{slot // PAGE:05d}")), name
    for seed in range(40):  # chunks of 53 tokens: some straddle a page boundary, some the ring's end
        eng.feed(ids(53, 100 + seed))
        check(eng)


def test_a_first_snapshot_after_a_reset_copies_only_the_pages_written_to(folder):
    """After reset() (a fresh engine, a new prompt on a server) the attention pages are known zeros: the first
    snapshot copies and hashes only the pages the prompt's tokens went to (the others share one zero buffer), and
    its parts are still exactly the full snapshot, also after a reset from a full ring."""
    eng = load_model(folder, window=WINDOW, sink=SINK, prefill_chunk=64)
    for _ in range(2):
        eng.feed(ids(PAGE + 10, 7))  # pages 0 and 1 of each attention layer
        check(eng)
        pages = kv_pages(eng)
        zeros = {n for n in pages if buffers(eng)[n].count_nonzero() == 0}
        assert zeros == {n for n in pages if n.endswith(".00002")}
        assert len({id(buffers(eng)[n]) for n in zeros}) == 1  # one shared host buffer, never copied
        eng.feed(ids(3 * WINDOW, 8))  # a full ring, then back to empty
        check(eng)
        eng.reset()
        check(eng)


def test_decode_graph_steps_and_a_stop_inside_a_chunk(folder):
    eng = load_model(folder, window=WINDOW, sink=SINK, prefill_chunk=64)
    eng.tokenizer = Tokenizer.cl100k_olmo()  # ids < 320 are its byte-level tokens
    eng.fast_decode = True  # the decode graph's steps, run eagerly on the CPU
    eng.burst_chunk = GRAPH_CHUNK  # in a GPU's bursts
    eng.feed(ids(500, 4))
    check(eng)
    logits = eng.feed(ids(3, 5), logits="last")
    eng.decode(logits, 40, chunk=16)
    check(eng)
    # a stop id in the middle of a 16-token chunk: the chunk's tail is rolled back on the device
    list(eng.generate(ids(2, 6), max_new_tokens=40, stop_ids=[]))
    first = eng.generated[5]
    list(eng.generate(ids(2, 6), max_new_tokens=40, stop_ids=[first]))
    check(eng)


def test_restore_seeds_the_pieces_and_a_full_cache(folder, tmp_path):
    eng = load_model(folder, window=WINDOW, sink=SINK, prefill_chunk=64)
    eng.feed(ids(700, 7))
    blob = eng.snapshot()
    eng.feed(ids(50, 8))
    check(eng)
    eng.restore(blob)
    parts = check(eng)
    assert bytes(parts) == blob  # nothing was copied: the restored blob is the cache
    eng.feed(ids(30, 9))
    check(eng)
    eng.reset()
    check(eng)

    unbounded = load_model(folder, window=None, prefill_chunk=64)  # pages appear as the cache grows
    for n, seed in ((100, 10), (300, 11), (1, 12)):
        unbounded.feed(ids(n, seed))
        check(unbounded)


def test_the_store_writes_only_new_pieces(folder, tmp_path):
    eng = load_model(folder, window=WINDOW, sink=SINK, prefill_chunk=64)
    with Store(tmp_path / "m.db") as store:
        sid = store.create_session("s", eng.fingerprint)
        eng.feed(ids(900, 13))
        first = eng.snapshot_parts()
        store.save_turn(sid, [{"role": "user", "text": "a"}], first)
        assert store.last_save["new_bytes"] == sum(len(d) for _, d in first.pieces)
        eng.feed(ids(20, 14))
        second = eng.snapshot_parts()
        store.save_turn(sid, [{"role": "user", "text": "b"}], second)
        old = {d for d, _ in first.pieces}
        fresh = [data for d, data in second.pieces if d not in old]
        assert store.last_save["new_bytes"] == sum(map(len, fresh)) < second.nbytes / 2
        assert store.load_snapshot(sid) == eng.snapshot()
        other = load_model(folder, window=WINDOW, sink=SINK)
        other.restore(store.load_snapshot(sid, joined=False))
        assert torch.equal(other.feed(ids(5, 15)), eng.feed(ids(5, 15)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_through_pinned_copies_and_the_decode_graph(folder):
    eng = load_model(folder, window=WINDOW, sink=SINK, device="cuda", dtype="bfloat16")
    assert eng.fast_decode  # the captured CUDA graph
    eng.feed(ids(500, 16))
    check(eng)
    logits = eng.feed(ids(3, 17), logits="last")
    eng.decode(logits, 150, chunk=16)  # wraps the ring
    parts = check(eng)
    assert all(t.is_pinned() for t in buffers(eng).values())
    cpu = load_model(folder, window=WINDOW, sink=SINK, dtype="bfloat16")
    cpu.restore(bytes(parts))  # and on the CPU, exactly the same state
    assert cpu.snapshot() == bytes(parts)


def test_a_kept_state_restores_exactly_and_stays_as_kept(folder):
    """Engine.keep / restore_kept (the server's hot prompt states): after restoring a kept state, feeding gives the
    logits a fresh engine gets from the same tokens, the kept copy is not changed by what is fed afterwards (restored
    twice, same logits), and incremental snapshots stay exact across it."""
    eng = load_model(folder, window=WINDOW, sink=SINK, prefill_chunk=64)
    prompt, a, b = ids(300, 20), ids(90, 21), ids(70, 22)
    eng.feed(prompt)
    check(eng)
    kept = eng.keep()
    eng.feed(a)  # moves on; the ring pages the kept copy shares with it are written to
    check(eng)
    eng.restore_kept(kept)
    assert bytes(eng.snapshot_parts()) == eng.snapshot()
    first = eng.feed(b)
    check(eng)
    eng.restore_kept(kept)
    again = eng.feed(b)
    fresh = load_model(folder, window=WINDOW, sink=SINK, prefill_chunk=64)
    fresh.feed(prompt)
    want = fresh.feed(b)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert eng.snapshot() == fresh.snapshot()

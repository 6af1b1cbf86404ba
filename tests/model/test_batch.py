"""Batched decode (model/batch.py): several streams, one step each, at different positions, joining and leaving
between steps. With full attention each stream's logits are checked against transformers on that stream's whole
sequence; with a bounded window (which transformers does not have) against the single-stream engine, itself
checked against transformers in test_parity.py, past the window's evictions."""

import pytest
import torch

from deltamem.model import load_model
from deltamem.model.batch import DecodeBatch
from deltamem.model.cache import DeltaState
from tests.model.hf_models import OLMO_SHAPES, QWEN_SHAPES, make_olmo_hybrid, make_qwen

MODELS = {
    "olmo_gqa_rope": lambda d: make_olmo_hybrid(d, vocab=320, **OLMO_SHAPES["olmo_gqa_rope"]),
    "olmo_odd_nope": lambda d: make_olmo_hybrid(d, vocab=320, **OLMO_SHAPES["olmo_odd_nope"]),
    "qwen3_5_gqa": lambda d: make_qwen(d, *QWEN_SHAPES["qwen3_5_gqa"][:1], **QWEN_SHAPES["qwen3_5_gqa"][1]),
}
PROMPTS = (5, 11, 17)  # prompt lengths of the three streams
STEPS = 14


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run_batched(eng, seqs: list[list[int]], prompts=PROMPTS) -> tuple[list[list[torch.Tensor]], DecodeBatch]:
    """Stream i: prefilled with its prompt by the engine, then fed its next tokens in batched steps. Stream 1 joins
    at step 3; stream 0 leaves after step 6, feeds two tokens alone on the engine and joins again. Returns each
    stream's logits after each of its tokens past the prompt, as the batch (or the engine, while alone) gave them,
    and the batch (on a GPU its last steps replay a captured graph)."""
    kept, pending = [], []
    for n, seq in zip(prompts, seqs, strict=True):
        eng.reset()
        pending.append(eng.feed(seq[:n])[-1])
        kept.append(eng.keep())
    batch = DecodeBatch(eng.model)
    rows = {}  # stream -> row
    fed = list(prompts)  # tokens of each stream fed so far
    got: list[list[torch.Tensor]] = [[p] for p in pending]

    def join(i: int) -> None:
        rows[i] = batch.add([st.copy() for st in kept[i].states])

    join(0)
    join(2)
    for step in range(STEPS):
        if step == 3:
            join(1)
        order = sorted(rows, key=rows.get)
        logits = batch.step([seqs[i][fed[i]] for i in order])
        for i, row in zip(order, logits, strict=True):
            fed[i] += 1
            got[i].append(row.clone())  # a captured step's logits are overwritten by the next
        if step == 6:  # stream 0 leaves, goes on alone on the engine, and comes back
            states = batch.remove(rows.pop(0))
            rows = {i: r - (r > 0) for i, r in rows.items()}  # later rows moved up
            eng.restore_kept(kept[0])
            eng._adopt(states)
            for _ in range(2):
                got[0].append(eng.feed([seqs[0][fed[0]]])[-1])
                fed[0] += 1
            rows[0] = batch.add([st.copy() for st in eng.states])
    return got, batch


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_steps_match_transformers_on_each_whole_sequence(tmp_path, name):
    ref = MODELS[name](tmp_path)
    eng = load_model(tmp_path, window=None)
    seqs = [_ids(n + STEPS + 2, seed) for seed, n in enumerate(PROMPTS)]
    got, _ = _run_batched(eng, seqs)
    for n, seq, rows in zip(PROMPTS, seqs, got, strict=True):
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([seq[: n + len(rows) - 1]])).logits[0, n - 1 :]
        assert len(rows) > 3
        assert (torch.stack(rows) - want).abs().max() < 1e-4


def _check_against_the_engine(eng, seed: int, tol: float, prompts=PROMPTS, relative: bool = False) -> DecodeBatch:
    """tol: on max |batched - alone|, or with `relative` on that over the largest |logit|."""
    seqs = [_ids(n + STEPS + 2, seed + i) for i, n in enumerate(prompts)]
    got, batch = _run_batched(eng, seqs, prompts)
    for n, seq, rows in zip(prompts, seqs, got, strict=True):
        eng.reset()
        want = [eng.feed(seq[:n])[-1]] + [eng.feed([t])[-1] for t in seq[n : n + len(rows) - 1]]
        got, want = torch.stack(rows).float(), torch.stack(want).float()
        err = (got - want).abs().max() / (want.abs().max() if relative else 1.0)
        assert err < tol
    return batch


@pytest.mark.parametrize("name", ["olmo_gqa_rope", "qwen3_5_gqa"])
def test_batched_steps_match_the_engine_past_a_bounded_window(tmp_path, name):
    MODELS[name](tmp_path)
    eng = load_model(tmp_path, window=6, sink=2)  # every stream evicts, the later ones from their prompt on
    _check_against_the_engine(eng, 10, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rope", [False, True])
def test_batched_steps_on_a_gpu_add_no_error_beyond_bf16_rounding(rope):
    """bf16 on the GPU: the batch (row-wise kernels, stacked attention, from the third step after the last join a
    captured CUDA graph) against the CPU float32 engine is no further than the CPU's own bf16 single stream is, as
    test_gpu_engine.py holds the single stream's graph (this random model is sensitive: bf16 alone moves its logits
    by several percent of the largest within a few dozen steps)."""
    from tests.model.test_gpu_engine import tiny_engine

    seqs = [_ids(n + STEPS + 2, 20 + i) for i, n in enumerate(PROMPTS)]

    def err(a, b):
        return max(
            float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(a, b, strict=True)
        )

    def alone(eng):
        out = []
        for n, seq, k in zip(PROMPTS, seqs, steps, strict=True):
            eng.reset()
            out.append(torch.stack([eng.feed(seq[:n])[-1]] + [eng.feed([t])[-1] for t in seq[n : n + k - 1]]).cpu())
        return out

    got, batch = _run_batched(tiny_engine(rope, "cuda", torch.bfloat16, window=16, sink=2), seqs)
    assert batch.graph_steps >= 4
    steps = [len(rows) for rows in got]
    cpu = alone(tiny_engine(rope, "cpu", torch.float32, window=16, sink=2))
    floor = err(alone(tiny_engine(rope, "cpu", torch.bfloat16, window=16, sink=2)), cpu)
    assert err([torch.stack(rows).cpu() for rows in got], cpu) < 1.25 * floor + 0.01


def test_a_state_of_another_model_is_refused(tmp_path):
    MODELS["olmo_gqa_rope"](tmp_path)
    eng = load_model(tmp_path, window=None)
    with pytest.raises(ValueError, match="layers"):
        DecodeBatch(eng.model).add(eng.states[:3])


@pytest.mark.parametrize("window", [6, None], ids=["bounded", "growing"])
def test_streams_joining_and_leaving_at_random_as_the_rows_grow_and_shrink(window):
    """Up to 11 streams join and leave at random (the stacks grow to 16 rows, are freed when the batch empties, and
    grow again; in between a step computes only the fewest rows that hold the streams, on the same stacks); a
    stream that left takes a step alone on the engine before it comes back. Every logit of every stream equals the
    engine's, fed that stream's tokens alone."""
    import random

    eng = load_model("random", window=window, sink=2)
    rng = random.Random(1)
    n, length = 11, 40
    seqs = [[rng.randrange(2, 300) for _ in range(length)] for _ in range(n)]
    prompt = [3 + i for i in range(n)]
    want, kept = [], []
    for i in range(n):
        eng.reset()
        want.append([eng.feed(seqs[i][: prompt[i]])[-1]] + [eng.feed([t])[-1] for t in seqs[i][prompt[i] : -1]])
        eng.reset()
        eng.feed(seqs[i][: prompt[i]])
        kept.append(eng.keep())
    batch = DecodeBatch(eng.model)
    fed, states = list(prompt), {i: [st.copy() for st in kept[i].states] for i in range(n)}
    inside: list[int] = []  # the stream in each of the batch's rows
    rows, stepped, stacks = [], [], []  # each round: the stacks' rows, the rows its step computed, their memory

    def check(i: int, logits: torch.Tensor) -> None:
        assert (logits - want[i][fed[i] - prompt[i] + 1]).abs().max() < 1e-4, i  # after token fed[i]
        fed[i] += 1

    for rnd in range(70):
        outside = [i for i in range(n) if i not in inside and fed[i] < length - 1]
        if outside and (rnd < 20 or rng.random() < 0.4):
            i = rng.choice(outside)
            joining = states.pop(i)
            assert batch.add(joining) == len(inside)
            inside.append(i)
            if window is not None:  # its own tensors let go while it is in the batch (their memory, not a view)
                own = [t for st in joining for t in ((st.conv, st.recurrent) if isinstance(st, DeltaState) else
                                                      (st.k, st.v, st.pos))]  # fmt: skip
                assert all(t.untyped_storage().nbytes() == 0 for t in own)
        if inside and (30 <= rnd < 42 or rng.random() < 0.2):
            i = inside.pop(r := rng.randrange(len(inside)))
            eng.restore_kept(kept[i])
            eng._adopt(batch.remove(r))
            check(i, eng.feed([seqs[i][fed[i]]])[-1])
            states[i] = [st.copy() for st in eng.states]
        if rnd == 50:  # everybody leaves
            while inside:
                i = inside.pop()
                states[i] = batch.remove(len(inside))
        for r in reversed(range(len(inside))):  # streams at their end leave
            if fed[inside[r]] >= length - 1:
                states[inside.pop(r)] = batch.remove(r)
        if inside:
            for i, logits in zip(inside, batch.step([seqs[i][fed[i]] for i in inside]), strict=True):
                check(i, logits)
        rows.append(batch._rows)
        stepped.append(batch.rows_stepped if inside else 0)
        stacks.append(batch._layers[0].conv.data_ptr() if batch._layers else None)
    assert sum(fed) - sum(prompt) > 200
    grown = rows.index(16)
    freed = rows.index(0, grown)
    assert max(rows[freed:]) > 0  # freed when everybody had left, then grown again
    changes = [k for k in range(1, len(rows)) if stacks[k] != stacks[k - 1]]
    assert changes == [k for k in range(1, len(rows)) if rows[k] != rows[k - 1]]  # new stacks only as rows change
    # the steps shrank and grew on the same 16 rows
    assert 16 in stepped[grown:freed] and min(s for s in stepped[stepped.index(16) : freed] if s) <= 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])  # fmt: skip
def test_a_reserved_batch_keeps_its_stacks_and_graphs_as_streams_come_and_go(device):
    """reserve(8) makes the stacks at once and, on a GPU, captures the step over 8, 4, 2 and 1 rows then. Six
    streams join and leave (the steps grow and shrink between 1 and 8 rows): no new stacks, no capture, on a GPU
    every step replayed; every logit equals the engine's (float32, same device) fed that stream's tokens alone; the
    stacks stay when the batch empties."""
    from tests.model.test_gpu_engine import ids_of, rel_err, tiny_engine

    eng = tiny_engine(False, device, torch.float32, window=16, sink=2)
    seqs = [ids_of(40, 30 + i) for i in range(6)]
    want = []
    for seq in seqs:
        eng.reset()
        want.append([eng.feed(seq[:5])[-1]] + [eng.feed([t])[-1] for t in seq[5:-1]])
    eng.reset()
    batch = DecodeBatch(eng.model)
    batch.reserve(8, eng.keep().states)
    stacks, replayed = batch._layers[0].conv.data_ptr(), batch.graph_steps
    assert batch._rows == 8 and batch.captures == (4 if device == "cuda" else 0)
    inside, fed, states, stepped = [], {}, {}, set()
    for i, seq in enumerate(seqs):
        eng.reset()
        eng.feed(seq[:5])
        states[i], fed[i] = eng.keep().states, 5
    for rnd in range(34):
        if rnd < 6 or rnd in (20, 22):  # all join, two leave at 12 and 16 and come back
            i = rnd if rnd < 6 else (1 if rnd == 20 else 4)
            assert batch.add(states.pop(i)) == len(inside)
            inside.append(i)
        if rnd in (12, 16, 26, 27, 28, 29, 30):
            r = inside.index({12: 1, 16: 4}.get(rnd, inside[-1]))
            i = inside.pop(r)
            states[i] = batch.remove(r)
        if inside:
            logits = batch.step([seqs[i][fed[i]] for i in inside])
            stepped.add(batch.rows_stepped)
            for i, row in zip(inside, logits, strict=True):
                fed[i] += 1
                assert rel_err(row, want[i][fed[i] - 5]) < 1e-4, (rnd, i)
    while inside:
        i = inside.pop()
        states[i] = batch.remove(len(inside))
    assert stepped == {1, 2, 4, 8}
    assert batch._layers[0].conv.data_ptr() == stacks and batch._rows == 8  # the same stacks all along, kept
    assert batch.captures == (4 if device == "cuda" else 0)
    if device == "cuda":
        assert batch.graph_steps == replayed + 34  # every step replayed

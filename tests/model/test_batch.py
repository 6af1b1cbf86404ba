"""Batched decode (model/batch.py): several streams, one step each, at different positions, joining and leaving
between steps. With full attention each stream's logits are checked against transformers on that stream's whole
sequence; with a bounded window (which transformers does not have) against the single-stream engine, itself
checked against transformers in test_parity.py, past the window's evictions."""

import pytest
import torch

from deltamem.model import load_model
from deltamem.model.batch import DecodeBatch
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


def _run_batched(eng, seqs: list[list[int]]) -> list[list[torch.Tensor]]:
    """Stream i: prefilled with its prompt by the engine, then fed its next tokens in batched steps. Stream 1 joins
    at step 3; stream 0 leaves after step 6, feeds two tokens alone on the engine and joins again. Returns each
    stream's logits after each of its tokens past the prompt, as the batch (or the engine, while alone) gave them."""
    kept, pending = [], []
    for n, seq in zip(PROMPTS, seqs, strict=True):
        eng.reset()
        pending.append(eng.feed(seq[:n])[-1])
        kept.append(eng.keep())
    batch = DecodeBatch(eng.model)
    rows = {}  # stream -> row
    fed = list(PROMPTS)  # tokens of each stream fed so far
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
            got[i].append(row)
        if step == 6:  # stream 0 leaves, goes on alone on the engine, and comes back
            states = batch.remove(rows.pop(0))
            rows = {i: r - (r > 0) for i, r in rows.items()}  # later rows moved up
            eng.restore_kept(kept[0])
            eng._adopt(states)
            for _ in range(2):
                got[0].append(eng.feed([seqs[0][fed[0]]])[-1])
                fed[0] += 1
            rows[0] = batch.add([st.copy() for st in eng.states])
    return got


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_steps_match_transformers_on_each_whole_sequence(tmp_path, name):
    ref = MODELS[name](tmp_path)
    eng = load_model(tmp_path, window=None)
    seqs = [_ids(n + STEPS + 2, seed) for seed, n in enumerate(PROMPTS)]
    got = _run_batched(eng, seqs)
    for n, seq, rows in zip(PROMPTS, seqs, got, strict=True):
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([seq[: n + len(rows) - 1]])).logits[0, n - 1 :]
        assert len(rows) > 3
        assert (torch.stack(rows) - want).abs().max() < 1e-4


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["olmo_gqa_rope", "qwen3_5_gqa"])
def test_batched_steps_match_the_engine_past_a_bounded_window(tmp_path, name, device):
    """On a GPU the single stream runs the Triton kernels, the batch their row-wise forms and per-row attention."""
    MODELS[name](tmp_path)
    eng = load_model(tmp_path, device=device, window=6, sink=2)  # every stream evicts, the later ones from the prompt
    seqs = [_ids(n + STEPS + 2, 10 + seed) for seed, n in enumerate(PROMPTS)]
    got = _run_batched(eng, seqs)
    for n, seq, rows in zip(PROMPTS, seqs, got, strict=True):
        eng.reset()
        want = [eng.feed(seq[:n])[-1]] + [eng.feed([t])[-1] for t in seq[n : n + len(rows) - 1]]
        assert (torch.stack(rows) - torch.stack(want)).abs().max() < (1e-4 if device == "cpu" else 2e-3)


def test_a_state_of_another_model_is_refused(tmp_path):
    MODELS["olmo_gqa_rope"](tmp_path)
    eng = load_model(tmp_path, window=None)
    with pytest.raises(ValueError, match="layers"):
        DecodeBatch(eng.model).add(eng.states[:3])

"""The degenerate-loop stop: LoopGuard against a brute-force check of periodicity, generation with it stopping at
exactly the first token where the unguarded run's output became a loop (host loop and decode-graph path), and the
agent's reply carrying the marker while its state stays the text it read."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltamem.agent.session import LOOP_MARKER, AgentSession
from deltamem.model import load_model
from deltamem.model.generation import GRAPH_CHUNK
from deltamem.model.sampling import LoopGuard, Sampler
from deltamem.model.tokenizer import Tokenizer
from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid


def looping(ids, span, max_period, min_repeats):
    """Brute force: is some suffix of at least max(span, p * min_repeats) tokens periodic with a period p?"""
    for p in range(1, max_period + 1):
        need = max(span, p * min_repeats)
        if need <= len(ids):
            tail = ids[-need:]
            if tail == (tail[:p] * need)[:need]:
                return True
    return False


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 3), max_size=60),
    st.lists(st.integers(0, 3), min_size=1, max_size=6),
    st.integers(0, 30),
    st.integers(2, 24),
    st.integers(1, 8),
    st.integers(2, 5),
)
def test_guard_matches_brute_force(prefix, pattern, copies, span, max_period, min_repeats):
    ids = prefix + pattern * copies
    assert LoopGuard(span, max_period, min_repeats)(ids) == looping(ids, span, max_period, min_repeats)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmo")
    make_olmo_hybrid(d, vocab=320, **OLMO_SHAPES["olmo_gqa_rope"])
    return d


@pytest.mark.parametrize("graph", [False, True])
def test_generation_stops_at_the_first_looping_token(tiny, graph):
    free = load_model(tiny, window=64)
    free.tokenizer = Tokenizer.cl100k_olmo()  # ids < 320 are its byte-level tokens
    list(free.generate([5, 6, 7], max_new_tokens=300, stop_ids=[]))
    want = next(n for n in range(1, 301) if looping(free.generated[:n], 16, 32, 4))  # this model loops, greedily

    eng = load_model(tiny, window=64)
    eng.tokenizer = free.tokenizer
    eng.fast_decode = graph  # the decode-graph path, eagerly on the CPU: 16-token chunks, the tail rolled back
    eng.burst_chunk = GRAPH_CHUNK
    list(eng.generate([5, 6, 7], max_new_tokens=300, stop_ids=[], loop_guard=LoopGuard(16)))
    assert eng.stopped_by == "loop" and eng.generated == free.generated[:want]
    assert eng.tokens_seen == 3 + want
    assert torch.allclose(eng.feed([9]), load_model(tiny, window=64).feed([5, 6, 7, *eng.generated, 9])[-1:], atol=1e-4)


def test_agent_reply_carries_the_marker_and_the_state_stays_in_step(caplog):
    session = AgentSession(load_model("random", window=64), None, "s")
    session.loop_guard = LoopGuard(span=2, max_period=1, min_repeats=2)  # any token twice in a row
    messages = [{"role": "user", "content": "hello"}]
    reply = session.reply(messages, max_new_tokens=400)
    assert session.engine.stopped_by == "loop" and reply.text.endswith(LOOP_MARKER)
    assert session.engine.tokens_seen == len(session.ids) and session.text == session.tok.decode(session.ids)
    with caplog.at_level(logging.WARNING):  # the next turn appends to that text: no roll-back, no re-read
        session.reply([*messages, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "ok"}],
                      max_new_tokens=4)  # fmt: skip
    assert not caplog.records


@pytest.mark.parametrize("fast", [False, True])
def test_repetition_penalty_matches_transformers_processor(fast):
    """Greedy generation with repetition_penalty, host sampler and device sampler (the decode-graph path run
    eagerly), against a loop that applies transformers' RepetitionPenaltyLogitsProcessor to the reply so far."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from tests.model.test_gpu_engine import ids_of, tiny_engine

    prompt = ids_of(12, 3)
    ref = tiny_engine(seed=1)
    proc = RepetitionPenaltyLogitsProcessor(1.8)
    logits, want = ref.feed(prompt)[-1], []
    for _ in range(40):
        row = proc(torch.tensor([want], dtype=torch.long), logits[None].clone())[0] if want else logits
        want.append(int(row.argmax()))
        logits = ref.feed([want[-1]])[-1]
    eng = tiny_engine(seed=1, fast=fast)
    list(eng.generate(prompt, max_new_tokens=40, stop_ids=[], repetition_penalty=1.8))
    assert eng.generated == want
    plain = tiny_engine(seed=1, fast=fast)
    list(plain.generate(prompt, max_new_tokens=40, stop_ids=[]))
    assert plain.generated != want  # the penalty did change this reply: the check above is not vacuous


@pytest.mark.parametrize("fast", [False, True])
def test_openai_penalties_bias_and_logprobs_match_a_plain_loop(fast):
    """presence/frequency penalties and logit_bias (OpenAI's formula, as vLLM applies it to the reply so far) with
    greedy decoding, host and device sampler, against a plain loop over a reference engine's logits; and the
    recorded log-probabilities against the log-softmax of the same processed logits."""
    from deltamem.model.sampling import Sampler
    from tests.model.test_gpu_engine import ids_of, tiny_engine

    prompt, bias = ids_of(12, 4), {7: 3.0, 11: -100.0}
    presence, frequency = 0.7, 0.4
    ref = tiny_engine(seed=2)
    logits, want, want_lp, counts = ref.feed(prompt)[-1], [], [], torch.zeros(ref.config.vocab_size)
    for _ in range(30):
        row = logits.clone()
        for tok, b in bias.items():
            row[tok] += b
        row = row - presence * (counts > 0) - frequency * counts
        lp = torch.log_softmax(row.double(), -1)
        want.append(int(row.argmax()))
        want_lp.append((float(lp[want[-1]]), lp.topk(3).indices.tolist()))
        counts[want[-1]] += 1
        logits = ref.feed([want[-1]])[-1]
    eng = tiny_engine(seed=2, fast=fast)
    sampler = Sampler(presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias, logprobs=3)
    list(eng.generate(prompt, max_new_tokens=30, stop_ids=[], sampler=sampler))
    assert eng.generated == want and 11 not in want
    assert [r[0] for r in sampler.records] == want
    for (tok, lp, alts), (ref_lp, ref_top) in zip(sampler.records, want_lp, strict=True):
        assert lp == pytest.approx(ref_lp, abs=1e-4) and [a for a, _ in alts] == ref_top and alts[0][0] == tok
    plain = tiny_engine(seed=2, fast=fast)
    list(plain.generate(prompt, max_new_tokens=30, stop_ids=[]))
    assert plain.generated != want  # the processing did change this reply: the check above is not vacuous
    cut = tiny_engine(seed=2, fast=fast)  # a reply stopped inside a decode burst: the tokens after it are forgotten
    sampler = Sampler(presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias, logprobs=0)
    list(cut.generate(prompt, max_new_tokens=30, stop_ids=[want[5]], sampler=sampler))
    stop = want.index(want[5]) + 1
    assert cut.generated == want[:stop] and [r[0] for r in sampler.records] == want[:stop]
    assert sum(sampler.counts.values()) in (0, stop)  # host counts (the device path keeps its own)
    with pytest.raises(ValueError, match="vocabulary"):
        Sampler(logit_bias={10**9: 1.0})(torch.zeros(50))


def test_the_device_sampler_keeps_its_counts_in_and_out_of_inference_mode():
    """A reply's first tokens drawn inside a decode burst (inference mode), the next ones by the guided loop outside
    it: the penalties' counts made in the first place still update in the second (they raised before)."""
    from deltamem.model.sampling import Sampler

    s = Sampler(presence_penalty=1.0, frequency_penalty=0.5)
    with torch.inference_mode():
        first = int(s.on_device(torch.arange(50.0)))
    second = int(s.on_device(torch.arange(50.0)))
    assert first == 49 and second == 48  # the top id, then, penalised, the one below it


def test_a_vanishing_temperature_is_greedy_on_both_paths():
    """logits / 1e-270 overflow: such a temperature draws the likeliest token (host and device samplers) rather than
    failing or drawing token 0."""
    row = torch.tensor([0.1, 2.0, -1.0, 1.5])
    for t in (1e-270, 1e-6):
        assert Sampler(temperature=t, seed=3)(row) == 1
        assert Sampler(temperature=t, seed=3).on_device(row).item() == 1

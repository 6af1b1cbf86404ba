"""generate(): greedy ids against transformers' generate, sampling against the softmax it should draw from,
streaming text and stop strings against the tokenizer's own decode."""

import numpy as np
import pytest
import torch

from deltamem.model import load_model
from deltamem.model.sampling import Sampler, TextStream
from deltamem.model.tokenizer import Tokenizer
from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid


@pytest.fixture(scope="module")
def cl100k():
    return Tokenizer.cl100k_olmo()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmo")
    ref = make_olmo_hybrid(d, vocab=320, **OLMO_SHAPES["olmo_gqa_rope"])
    return d, ref


def test_greedy_ids_match_transformers_generate(tiny, cl100k):
    d, ref = tiny
    prompt = torch.randint(2, 320, (12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.generate(prompt[None], max_new_tokens=30, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, 12:].tolist()
    eng = load_model(d)
    eng.tokenizer = cl100k  # ids < 320 are cl100k's byte-level tokens: any text will do here
    list(eng.generate(prompt.tolist(), max_new_tokens=30, stop_ids=[]))
    assert eng.generated == want
    assert eng.tokens_seen == 12 + 30  # the state has consumed prompt and every generated token


def test_generation_stops_at_eos_and_state_continues(tiny, cl100k):
    d, _ = tiny
    eng = load_model(d)
    eng.tokenizer = cl100k
    prompt = [5, 6, 7]
    list(eng.generate(prompt, max_new_tokens=10, stop_ids=[]))
    first = eng.generated[0]
    eng.reset()
    list(eng.generate(prompt, max_new_tokens=10, stop_ids=[first]))
    assert eng.generated == [first] and eng.tokens_seen == 4


def test_sampler_draws_from_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, 0.9])
    temp, top_k, top_p = 0.8, 4, 0.8
    # Independent expectation in numpy: temperature, keep top 4, then the smallest prefix with mass >= 0.8.
    x = logits.numpy() / temp
    keep = np.argsort(-x)[:top_k]
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    n_keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
    expected = np.zeros(6)
    expected[keep[:n_keep]] = p[:n_keep] / p[:n_keep].sum()
    s = Sampler(temp, top_p=top_p, top_k=top_k, seed=7)
    draws = np.bincount([s(logits) for _ in range(20000)], minlength=6) / 20000
    assert np.abs(draws - expected).max() < 0.015, (draws, expected)


def test_sampler_seed_and_greedy():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a = [Sampler(1.0, seed=3)(logits) for _ in range(5)]
    b = [Sampler(1.0, seed=3)(logits) for _ in range(5)]
    assert a == b
    s = Sampler(1.0, seed=4)
    assert len({s(logits) for _ in range(50)}) > 1
    assert Sampler(0.0)(logits) == int(logits.argmax()) == Sampler(1.0, top_k=1, seed=5)(logits)
    with pytest.raises(ValueError):
        Sampler(-1.0)


TEXT = "Déjà vu 🧑‍🚀 漢字 naïve\n\n  code: x = {'a': 1}  # END of line END"


def test_stream_reassembles_text_token_by_token(cl100k):
    ids = cl100k.encode(TEXT)
    stream = TextStream(cl100k)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == cl100k.decode(ids) == TEXT
    assert all("\ufffd" not in p for p in pieces)  # split multi-byte characters are held back, not mangled


def test_stop_string_cuts_and_never_leaks(cl100k):
    stream = TextStream(cl100k, stop=["END"])
    out = ""
    for i in cl100k.encode(TEXT):
        out += stream.push(i)
        assert not out.endswith(("E", "EN"))  # a possible start of the stop string is held back
        if stream.stopped:
            break
    out += stream.flush()
    assert out == TEXT[: TEXT.index("END")]


def test_earliest_stop_string_wins(cl100k):
    stream = TextStream(cl100k, stop=["END", "."])
    out = "".join(stream.push(i) for i in cl100k.encode("a.bENDc")) + stream.flush()
    assert out == "a" and stream.stopped


def test_ids_the_tokenizer_cannot_decode_are_never_sampled(tiny, cl100k):
    """A model's vocab is often padded past its tokenizer: generate must pick the best decodable id."""
    d, _ = tiny
    bytes_only = Tokenizer(cl100k.encoding, {i: cl100k.decode_bytes([i]) for i in range(256)}, name="bytes")
    assert bytes_only.unknown_ids(320) == list(range(256, 320))
    eng, ref = load_model(d), load_model(d)
    eng.tokenizer = bytes_only
    prompt = [5, 6, 7]
    list(eng.generate(prompt, max_new_tokens=40, stop_ids=[]))
    want, logits, picked_unknown = [], ref.feed(prompt)[-1], False
    for _ in range(40):
        picked_unknown |= int(logits.argmax()) >= 256
        want.append(int(logits[:256].argmax()))
        logits = ref.feed([want[-1]])[-1]
    assert picked_unknown  # the unmasked model would have emitted an undecodable id
    assert eng.generated == want

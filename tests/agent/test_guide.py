"""Guided tool names (agent/guide.py): the allowed set against a brute-force scan of the whole vocabulary, and
generation through the engine (host loop and device-side bursts) writing only offered names where a name is due."""

import pytest

from deltamem.agent.guide import ToolNameGuide
from deltamem.model import load_model
from deltamem.model.tokenizer import Tokenizer

NAMES = ["grep", "read_file", "map", "list_dir"]
VOCAB = 100352  # the random model's (OLMo's padded vocabulary)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.cl100k_olmo()


def brute_force(tok, written: str, ends: str) -> set[int]:
    """Every id whose text, after `written`, stays on or completes the way to an offered name and its end."""
    targets = [n + ends for n in NAMES]
    out = set()
    for i in range(VOCAB):
        try:
            text = tok.decode_bytes([i]).decode("utf-8", errors="ignore")
        except (KeyError, ValueError):
            continue
        if text and any(t.startswith(written + text) or (written + text).startswith(t) for t in targets):
            out.add(i)
    return out


@pytest.mark.parametrize(("syntax", "opening", "ends"), [("json", '<tool_call>\n{"name": "', '"'),
                                                         ("xml", "<tool_call>\n<function=", ">")])  # fmt: skip
def test_allowed_ids_are_exactly_those_on_the_way_to_an_offered_name(tok, syntax, opening, ends):
    guide = ToolNameGuide(tok, NAMES, VOCAB, syntax)
    for written in ["", "r", "read_", "l", "gre"]:
        mask = guide(tok.encode("Let me look. " + opening + written))
        assert mask is not None and mask.shape == (VOCAB,)
        assert set(mask.nonzero()[:, 0].tolist()) == brute_force(tok, written, ends), written
    for free in ["Let me look.", opening + "xyz", opening + 'grep", "arguments": {"pattern": "', "<tool_call>"]:
        assert guide(tok.encode(free)) is None, free  # no name due, or a name off every offered one


class WholeReplyIsAName(ToolNameGuide):
    """A guide for which the reply itself opens with the name (no `<tool_call>` needed): the random model never
    writes one, and this drives the engine's guided path all the same."""

    def partial(self, ids):
        text = self.tok.decode(list(ids))
        return None if '"' in text else text


@pytest.mark.parametrize("fast", [False, True])
def test_generation_writes_only_an_offered_name_where_one_is_due(tok, fast):
    eng = load_model("random", window=64)
    eng.fast_decode = fast  # on the CPU: the device-side burst loop, run eagerly
    prompt = tok.encode("Which tool now? ")
    free = eng.sibling()
    free.fast_decode = fast
    "".join(free.generate(prompt, max_new_tokens=12, stop_ids=[]))
    unguided = tok.decode(free.generated)
    assert not any(unguided.startswith(n + '"') for n in NAMES)  # left alone, the random model names none
    for seed in range(3):
        eng.reset()
        text = "".join(eng.generate(prompt, max_new_tokens=12, stop_ids=[], temperature=1.0, seed=seed,
                                    guide=WholeReplyIsAName(tok, NAMES, VOCAB)))  # fmt: skip
        assert any(text.startswith(n + '"') for n in NAMES), text
        assert len(eng.generated) == 12 and eng.tokens_seen == len(prompt) + 12  # every token fed, then free
        assert tok.decode(eng.generated) == text

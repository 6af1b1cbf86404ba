"""Ranked line search (tools/rank.py) against a plain-Python scorer (BM25's idf as SQLite's FTS5 documents it,
summed over the terms a line holds) on words that stemming leaves alone, and against hand-written cases for what
the stemmer adds: word forms of one stem found, two words required where two are asked."""

import math
import random

from deltamem.tools.rank import ranked, words

VOCAB = ["delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta", "gamma"]  # porter leaves each as it is


def scores(lines: list[str], terms: list[str]) -> list[float]:
    """Each line's BM25 score with b = 0 and k1 -> 0: the sum of the idf of the terms it holds."""
    docs = [set(line.split(": ", 1)[1].lower().split()) for line in lines]
    idf = {t: max(math.log((len(docs) - n + 0.5) / (n + 0.5)), 1e-6) for t in terms
           for n in [sum(t in d for d in docs)]}  # fmt: skip
    return [sum(idf[t] for t in terms if t in d) for d in docs]


def test_order_is_the_held_words_idf_then_the_lines_order():
    rng = random.Random(0)
    for _ in range(30):
        lines = [f"f{i}.txt:1: " + " ".join(rng.choices(VOCAB, k=rng.randint(1, 6))) for i in range(40)]
        terms = rng.sample(VOCAB, 3)
        score = scores(lines, terms)
        held = [i for i, line in enumerate(lines) if sum(t in line.split(": ", 1)[1].split() for t in terms) >= 2]
        got = ranked(lines, terms, limit=40)
        if not held:
            assert got == []
            continue
        best = max(score[i] for i in held)
        want = sorted((i for i in held if score[i] >= best / 2), key=lambda i: (-score[i], i))
        assert [int(g.split(":")[0][1:-4]) for g in got] == want


def test_word_forms_anchors_and_two_words():
    lines = [
        "a.pdf:3: [page 1] The approval date for permit P-48 is 21 June 2026.",
        "a.pdf:4: [page 1] The approval date for permit P-94 is 2 May 2026.",
        "b.docx:9: [section Permits 2] The office approves requests weekly.",
        "c.md:1: Terminating a lease needs notice.",
    ]
    assert words("When was permit P-48 approved?") == ["permit", "p-48", "approved"]
    assert ranked(lines, words("When was permit P-48 approved?")) == [lines[0]]  # stems: approved ~ approval
    assert ranked(lines, words("lease termination")) == [lines[3]]
    assert ranked(lines, ["permit", "weekly"]) == [lines[2]]  # a line is about its section's heading too
    assert ranked(lines, ["page", "approval"]) == []  # not its page
    assert ranked(lines, ["approval", "nothing"]) == []  # one word in common is no answer
    assert ranked([], ["x"]) == [] and ranked(lines, []) == []

"""Ranked search over lines: SQLite's FTS5 full-text index (in memory), its porter stemmer, BM25's term weights.

grep's answer where a pattern matched nothing, and the `search` tool's: the lines holding the most of some words,
rare words weighing more than common ones (BM25's idf), word forms matched by their stems ("approved" finds "approval",
"terminates" finds "termination"), so a paraphrase of a passage still finds it. A line must hold two of the words
where two or more are given (one word in common with a question is not an answer to it).
"""

from __future__ import annotations

import math
import re
import sqlite3

RANKED_LINES = 20  # lines shown at most
MAX_WORDS = 8  # words searched at most

# letters and digits, hyphenated words whole (Meadow-4); `_` splits snake_case (penalty_rate: penalty, rate)
_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*")
# words that name no one thing: English glue, question words, and definitions' keywords of the map's languages
STOP = {
    "the", "and", "for", "of", "in", "on", "at", "to", "is", "are", "by", "with", "from", "def", "class", "function",
    "const", "let", "var", "func", "pub", "type", "interface", "struct", "enum", "impl", "trait", "static", "async",
    "export", "import", "return", "raise", "self", "public", "private", "final", "void", "fn", "a", "an", "what",
    "which", "where", "when", "who", "how", "why", "does", "do", "did", "it", "its", "or", "be", "been", "was", "were",
    "this", "that", "these", "those", "can", "could", "would", "should", "will", "may", "might", "must", "has", "have",
    "had", "not", "there", "their", "than", "then", "into", "about", "as", "any", "all",
}  # fmt: skip


def words(text: str) -> list[str]:
    """The words of a pattern or question (regular-expression escapes such as \\b dropped; camelCase kept whole),
    lower case, STOP words and single characters left out, each once, at most MAX_WORDS."""
    found = _WORD.findall(re.sub(r"\\.", " ", text))
    return list(dict.fromkeys(w.lower() for w in found if len(w) >= 2 and w.lower() not in STOP))[:MAX_WORDS]


def ranked(lines: list[str], terms: list[str], limit: int = RANKED_LINES) -> list[str]:
    """The best of `lines` (each 'path:N: [anchor] text', as grep shows them) for `terms`, best first: each line
    scored by the BM25 weights (idf) of the terms it holds, word stems matched by FTS5 over the lines' text (anchors
    and paths aside), ties in the lines' order; where there are two terms or more, only lines with at least two;
    only lines scoring at least half the best one's.

    That is BM25 with no length normalisation (b = 0) and a term's frequency counted once (k1 -> 0): a line is no
    document, and among lines the shortest is not the best (a call `f(X)` before the definition `X = 5`)."""
    if not terms or not lines:
        return []
    con = sqlite3.connect(":memory:")
    try:
        con.execute("create virtual table t using fts5(body, tokenize = 'porter unicode61')")
        con.executemany("insert into t(rowid, body) values (?, ?)", ((i, _body(line)) for i, line in enumerate(lines)))
        hits = [{r for (r,) in con.execute("select rowid from t where t match ?", ['"' + t.replace('"', '""') + '"'])}
                for t in terms]  # fmt: skip
    finally:
        con.close()
    n = len(lines)
    idf = [max(math.log((n - len(h) + 0.5) / (len(h) + 0.5)), 1e-6) for h in hits]  # FTS5's bm25() idf
    held: dict[int, list[int]] = {}
    for k, h in enumerate(hits):
        for r in h:
            held.setdefault(r, []).append(k)
    need = min(2, len(terms))
    scored = sorted((-sum(idf[k] for k in ks), r) for r, ks in held.items() if len(ks) >= need)
    if not scored:
        return []
    best = -scored[0][0]
    return [lines[r] for score, r in scored[:limit] if -score >= best / 2]


def _body(line: str) -> str:
    """What a result line 'path:N: [anchor] text' is searched by: its text and the heading of the section or sheet it
    is in (a line under "## Termination" is about termination), not its path, number, page, slide or message."""
    parts = line.split(": ", 1)
    text = parts[1] if len(parts) == 2 else line
    if text.startswith("[") and "] " in text:
        anchor, text = text[1:].split("] ", 1)
        headings = [a.split(" ", 1)[1] for a in anchor.split(", ") if a.startswith(("section ", "sheet "))]
        text = " ".join([*headings, text])
    return text

"""Guided tool names: inside a tool call, the model may only write the name of a tool it was offered.

The small default model opens a call well but often names the function the question mentions instead of a tool
(`{"name": "is_coroutine_callable", ...}`: benchmarks/results/agent_eval.md), which the agent can only refuse.
Constrained decoding fixes that at the source, as vLLM's guided decoding and llama.cpp's grammars do for a whole
call; this guide constrains only the name, the one place where the model goes wrong and a wrong token costs a step.

Once the reply so far ends inside an open call's name (JSON: `<tool_call>` then `{"name": "` and part of a name;
XML: `<tool_call>` then `<function=` and part of a name), the tokens that may come next are those whose text keeps
the name a prefix of an offered name followed by its end (`"` or `>`), or completes one and goes on. Everywhere
else the guide returns None and sampling is free. A name the model has already taken off every offered one (it can
only begin outside the guide, e.g. with a space) is left alone; the parser then reports the call as invalid.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import torch

_OPEN = {
    "json": re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"\n]*)\Z'),
    "xml": re.compile(r"<tool_call>\s*<function=([^>\n]*)\Z"),
}
_END = {"json": '"', "xml": ">"}
TAIL = 48  # generated tokens decoded to find an open call: `<tool_call>{"name": "` and a name fit in far fewer


class ToolNameGuide:
    def __init__(self, tokenizer, names: Sequence[str], vocab_size: int, syntax: str = "json"):
        """vocab_size: the model's (its logits' width, which may pad the tokenizer's)."""
        if syntax not in _OPEN:
            raise ValueError(f"syntax must be one of {sorted(_OPEN)}")
        if not names:
            raise ValueError("a guide needs at least one tool name")
        self.tok, self.syntax = tokenizer, syntax
        self.targets = [n + _END[syntax] for n in names]
        self.vocab_size = vocab_size
        self._by_first: dict[str, list[tuple[int, str]]] | None = None  # first character -> (id, text)
        self._masks: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _index(self) -> dict[str, list[tuple[int, str]]]:
        if self._by_first is None:
            by_first: dict[str, list[tuple[int, str]]] = defaultdict(list)
            for i in range(self.vocab_size):
                try:
                    raw = self.tok.decode_bytes([i])
                except (KeyError, ValueError):  # an id the tokenizer has no bytes for (vocab padding)
                    continue
                text = raw.decode("utf-8", errors="ignore") if raw else ""
                if text:
                    by_first[text[0]].append((i, text))
            self._by_first = dict(by_first)
        return self._by_first

    def partial(self, ids: Sequence[int]) -> str | None:
        """The name written so far, if the reply `ids` ends inside an open call's name; else None."""
        if not ids:
            return None
        text = self.tok.decode(list(ids[-TAIL:]))
        m = _OPEN[self.syntax].search(text)
        return None if m is None else m.group(1)

    def __call__(self, ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        """A [vocab] bool mask of the ids allowed next after the reply `ids`, or None where sampling is free."""
        written = self.partial(ids)
        if written is None:
            return None
        targets = [t for t in self.targets if t.startswith(written)]
        if not targets:
            return None
        key = (written, torch.device(device))
        mask = self._masks.get(key)
        if mask is None:
            rests = [t[len(written) :] for t in targets]
            allowed = [
                i
                for c in {r[0] for r in rests}
                for i, text in self._index().get(c, ())
                if any(r.startswith(text) or text.startswith(r) for r in rests)
            ]
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[allowed] = True
            mask = self._masks[key] = mask.to(device)
        return mask

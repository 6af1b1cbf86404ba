"""Token sampling (greedy / temperature / top-k / top-p, seeded) and incremental detokenisation with stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deltamem.model.tokenizer import Tokenizer


class Sampler:
    """temperature 0 is greedy (argmax); otherwise softmax(logits / T) restricted to the top_k tokens (0: all)
    and to the smallest set whose probability reaches top_p, drawn with a seeded generator.

    repetition_penalty p (1: off) applies CTRL's penalty, as transformers' RepetitionPenaltyLogitsProcessor does, to
    the tokens this sampler has drawn (the reply so far; the prompt, in an agent session a whole repository, is not
    penalised): their logits are divided by p where positive, multiplied by p where negative, before sampling."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
    ):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.penalty = repetition_penalty
        self.drawn: set[int] = set()  # host path
        self._drawn_on: dict[torch.device, torch.Tensor] = {}  # device path: a [vocab] bool mask per device
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()  # a fresh random seed for this generator only; the global RNG is left alone
        else:
            self.gen.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        # logits: [vocab]
        if self.penalty != 1.0 and self.drawn:
            idx = torch.tensor(sorted(self.drawn), device=logits.device)
            logits = logits.index_copy(0, idx, self._penalised(logits[idx]))
        tok = self._draw(logits)
        self.drawn.add(tok)
        return tok

    def _penalised(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x / self.penalty, x * self.penalty)

    def _draw(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        x = logits.float().cpu() / self.temperature
        if self.top_k:
            kth = torch.topk(x, min(self.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            cum = sorted_x.softmax(-1).cumsum(-1)
            drop = cum - sorted_x.softmax(-1) >= self.top_p  # keep tokens until the mass before them reaches p
            x[order[drop]] = float("-inf")
        return int(torch.multinomial(x.softmax(-1), 1, generator=self.gen))

    def on_device(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample without leaving the logits' device and without a host sync: logits [vocab] -> [1] int64.
        Greedy is the same argmax as __call__; otherwise the same distribution (temperature, top-k, top-p),
        drawn by Gumbel-max (argmax of logits / T plus Gumbel noise) from a generator of this sampler on that
        device, seeded from this sampler's seed: reproducible, but not the same draws as __call__. The repetition
        penalty keeps its drawn tokens in a mask on the device."""
        if self.penalty != 1.0:
            mask = self._drawn_on.get(logits.device)
            if mask is None:
                mask = self._drawn_on[logits.device] = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            tok = self._draw_on_device(torch.where(mask, self._penalised(logits), logits))
            mask.index_fill_(0, tok, True)
            return tok
        return self._draw_on_device(logits)

    def _draw_on_device(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax().view(1)
        x = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(x, min(self.top_k, x.numel())).values[-1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            probs = sorted_x.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # as __call__: keep until the mass before reaches p
            x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))  # a permutation: no index sync
        u = torch.rand(x.shape, generator=self._generator_on(x.device), device=x.device)
        return (x - torch.log(-torch.log(u))).argmax().view(1)  # u = 0 gives -inf noise: never drawn

    def _generator_on(self, device: torch.device) -> torch.Generator:
        gens = self.__dict__.setdefault("_device_gens", {})
        if device not in gens:
            g = torch.Generator(device=device)
            g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.gen)))  # from this sampler's seed
            gens[device] = g
        return gens[device]


class LoopGuard:
    """Ends a reply that has fallen into a loop: its last tokens are one pattern of at most `max_period` tokens
    repeated at least `min_repeats` times over at least `span` tokens (a small model's degenerate output: the same
    fragment until the token limit). Checked after every token; a cheap test rejects a period whose last token does
    not repeat, so it costs a few dozen comparisons per token."""

    def __init__(self, span: int = 64, max_period: int = 32, min_repeats: int = 4):
        if span < 2 or max_period < 1 or min_repeats < 2:
            raise ValueError("need span >= 2, max_period >= 1, min_repeats >= 2")
        self.span, self.max_period, self.min_repeats = span, max_period, min_repeats

    def __call__(self, ids: Sequence[int]) -> bool:
        n = len(ids)
        for p in range(1, self.max_period + 1):
            need = max(self.span, p * self.min_repeats)
            if need > n or ids[n - 1] != ids[n - 1 - p]:
                continue
            if all(ids[i] == ids[i - p] for i in range(n - need + p, n)):
                return True
        return False


def account(
    tok: int, eos: set[int], stream: TextStream, seen: list[int], pieces: list[str], loop_guard: LoopGuard | None = None
) -> str | None:
    """One sampled token of a reply: appended to `seen`, its text (if any) to `pieces`; returns why the reply ends
    with it ("eos", "stop", "loop"), or None. Engine.generate and deltamem serve's batched decode both count by it."""
    seen.append(tok)
    if tok in eos:
        return "eos"
    piece = stream.push(tok)
    if piece:
        pieces.append(piece)
    if stream.stopped:
        return "stop"
    if loop_guard is not None and loop_guard(seen):
        return "loop"
    return None


class TextStream:
    """Turns token ids into printable text pieces: holds back incomplete UTF-8 sequences and any tail that could
    still become a stop string; `stopped` turns true once a stop string appears (it is never emitted)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds incomplete sequences
        self.pending = ""  # decoded text not yet emitted
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.utf8.decode(self.tok.decode_bytes([token]))
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:  # the earliest stop string in the text wins, whichever is listed first
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((_overlap(self.pending, s) for s in self.stop), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out = "" if self.stopped else self.pending + self.utf8.decode(b"", final=True)
        self.pending = ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0

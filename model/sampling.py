"""Token sampling (greedy / temperature / top-k / top-p, seeded) and incremental detokenisation with stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deltamem.model.tokenizer import Tokenizer


GREEDY_BELOW = 1e-5  # a temperature under this samples greedily


class Sampler:
    """temperature 0 is greedy (argmax); otherwise softmax(logits / T) restricted to the top_k tokens (0: all)
    and to the smallest set whose probability reaches top_p, drawn with a seeded generator.

    repetition_penalty p (1: off) applies CTRL's penalty, as transformers' RepetitionPenaltyLogitsProcessor does, to
    the tokens this sampler has drawn (the reply so far; the prompt, in an agent session a whole repository, is not
    penalised): their logits are divided by p where positive, multiplied by p where negative, before sampling.

    OpenAI's logit processing, after it: logit_bias {id: b} adds b to those ids' logits; presence_penalty and
    frequency_penalty subtract, from each id drawn so far (the reply, as vLLM counts them), presence once and
    frequency times its count. logprobs=k (0 to 20) records, for each drawn token, its log-probability under the
    processed logits (masks included, before temperature and top-p/top-k) and the k likeliest alternatives:
    `records`, a list of (id, logprob, [(id, logprob), ...])."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
    ):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError("logprobs: from 0 to 20 alternatives")
        # a temperature too small to divide by (logits / 1e-270 overflow to inf: no distribution) is greedy, as vLLM's
        self.temperature = 0.0 if temperature < GREEDY_BELOW else temperature
        self.top_p, self.top_k = top_p, top_k
        self.penalty = repetition_penalty
        self.presence, self.frequency, self.bias = presence_penalty, frequency_penalty, dict(logit_bias or {})
        self.logprobs = logprobs
        self.records: list[tuple[int, float, list[tuple[int, float]]]] = []
        self._counts_on: dict[torch.device, torch.Tensor] = {}  # [vocab] counts of the ids drawn, where penalised
        self._bias_on: dict[torch.device, torch.Tensor] = {}
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()  # a fresh random seed for this generator only; the global RNG is left alone
        else:
            self.gen.manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the logits as they are (no penalty, bias or log-probabilities): one argmax over several
        replies' rows draws what each row's own would."""
        return (self.temperature == 0 and self.penalty == 1.0 and not (self.bias or self.presence or self.frequency)
                and self.logprobs is None)  # fmt: skip

    @torch.inference_mode()  # as on_device: the counts are made and updated in one mode wherever it is called
    def __call__(self, logits: torch.Tensor) -> int:
        # logits: [vocab]
        counts = self._counts(logits)
        logits = self._processed(logits, counts)
        tok = self._draw(logits)
        if counts is not None:
            counts[tok] += 1
        if self.logprobs is not None:
            self._record(logits, tok)
        return tok

    def _counts(self, logits: torch.Tensor) -> torch.Tensor | None:
        """How often each id was drawn, [vocab] on the logits' device, where a penalty needs it (else None)."""
        if self.penalty == 1.0 and not self.presence and not self.frequency:
            return None
        if logits.device not in self._counts_on:
            self._counts_on[logits.device] = torch.zeros(logits.shape, device=logits.device)
        return self._counts_on[logits.device]

    @property
    def counts(self) -> dict[int, int]:
        """The ids drawn (and kept) so far where a penalty counts them, with how often."""
        out: dict[int, int] = {}
        for c in self._counts_on.values():
            for i in c.nonzero().flatten().tolist():
                out[i] = out.get(i, 0) + int(c[i])
        return out

    def _processed(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """The logits after the repetition penalty, then OpenAI's bias and penalties (in float32): the same
        arithmetic on the host and the device path, so both draw the same tokens."""
        if self.penalty != 1.0:
            logits = torch.where(counts > 0, self._penalised(logits), logits)
        if self.bias or self.presence or self.frequency:
            logits = logits.float()
        if self.bias:
            logits = logits + self._bias(logits)
        if self.presence or self.frequency:
            logits = logits - (self.presence * (counts > 0) + self.frequency * counts)
        return logits

    def _bias(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias as a dense [vocab] row on the logits' device (built once per device)."""
        row = self._bias_on.get(logits.device)
        if row is None:
            row = torch.zeros(logits.shape, dtype=torch.float32)
            ids = torch.tensor(list(self.bias), dtype=torch.long)
            if ids.numel() and (ids.min() < 0 or ids.max() >= row.numel()):
                raise ValueError(f"logit_bias names ids outside the vocabulary (0 to {row.numel() - 1})")
            row[ids] = torch.tensor(list(self.bias.values()), dtype=torch.float32)
            row = self._bias_on[logits.device] = row.to(logits.device)
        return row

    def _record(self, logits: torch.Tensor, tok: int) -> None:
        lp = logits.float().log_softmax(-1)
        top = lp.topk(self.logprobs) if self.logprobs else None
        alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
        alts = [(i, x) for i, x in alts if x > float("-inf")]  # a mask (a guide's) may leave fewer than asked
        self.records.append((tok, float(lp[tok]), alts))

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

    @torch.inference_mode()  # its counts are made, and updated, in one mode wherever it is called from
    def on_device(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample without leaving the logits' device and without a host sync: logits [vocab] -> [1] int64.
        Greedy is the same argmax as __call__; otherwise the same distribution (temperature, top-k, top-p),
        drawn by Gumbel-max (argmax of logits / T plus Gumbel noise) from a generator of this sampler on that
        device, seeded from this sampler's seed: reproducible, but not the same draws as __call__. The penalties
        keep their counts of drawn tokens on the device."""
        counts = self._counts(logits)
        logits = self._processed(logits, counts)
        tok = self._draw_on_device(logits)
        if counts is not None:
            counts.index_add_(0, tok, torch.ones(1, device=logits.device))
        if self.logprobs is not None:  # a read-back a token: only where asked
            self._record(logits, int(tok))
        return tok

    @torch.inference_mode()
    def discard(self, ids: Sequence[int]) -> None:
        """Forget the last drawn `ids` (a decode burst sampled past where its reply stopped, Engine's fast path):
        the penalties count, and the log-probabilities record, only the tokens kept."""
        for counts in self._counts_on.values():
            idx = torch.tensor(list(ids), device=counts.device)
            counts.index_add_(0, idx, -torch.ones(len(ids), device=counts.device))
        if self.logprobs is not None:
            del self.records[len(self.records) - len(ids) :]

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


def allowed(row: torch.Tensor, unknown: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A next-token logits row (or rows [B, vocab]) with what may not be sampled at -inf: the ids the tokenizer
    cannot decode (`unknown`), and those a guide's `mask` (True: allowed) forbids."""
    if unknown is not None:
        row = row.index_fill(-1, unknown, float("-inf"))
    return row if mask is None else row.masked_fill(~mask, float("-inf"))


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

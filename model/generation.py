"""Generation over an Engine's state: sampling loops on the host and on the decode graph (bursts of tokens between
two reads on the host), stop strings and ids, the loop guard and a guide's masks. Engine (model/engine.py) inherits
it; it reads the engine's state through feed(), _changing(), _advance() and the decode step it builds here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch

from deltamem.model.cuda_graph import Burst, DecodeGraph
from deltamem.model.sampling import LoopGuard, Sampler, TextStream, account, allowed

GRAPH_CHUNK = 16  # tokens generate() decodes on the device between two reads of their ids on the host


class Generation:
    """generate(), decode() and the decode step of an Engine."""

    def unknown_ids(self) -> torch.Tensor | None:
        """Ids the model can emit but the tokenizer cannot decode (vocab padding): never sampled."""
        if getattr(self, "_unknown_for", None) is not self.tokenizer:
            ids = self.tokenizer.unknown_ids(self.config.vocab_size)
            self._unknown = torch.tensor(ids, dtype=torch.long, device=self.device) if ids else None
            self._unknown_for = self.tokenizer
        return self._unknown

    def generate(
        self,
        ids: Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_ids: Sequence[int] | None = None,
        loop_guard: LoopGuard | None = None,
        repetition_penalty: float = 1.0,
        guide: Callable[..., torch.Tensor | None] | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[str]:
        """Feed `ids` (the prompt's new tokens), then sample up to max_new_tokens, yielding text pieces as they
        become printable. Stops at an end-of-sequence id (default: the model's eos) or a stop string, which is
        not yielded, or when `loop_guard` finds the reply repeating itself. Every sampled token is fed, so the state
        has consumed exactly prompt + generated ids; `self.generated` holds the generated ids afterwards and
        `self.stopped_by` why it ended: "eos", "stop", "loop" or "length". repetition_penalty: see Sampler.
        guide(generated_ids, device): a [vocab] bool mask of the ids allowed next, or None where sampling is free
        (agent/guide.py); guided tokens are sampled on the host and fed one at a time, the rest as usual.
        sampler: one made by the caller (OpenAI's penalties, logit bias, log-probabilities: see Sampler) in place of
        temperature, top_p, top_k, seed and repetition_penalty."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; feed() token ids directly")
        sampler = sampler or Sampler(temperature, top_p, top_k, seed, repetition_penalty)
        eos = set(self.config.eos_ids if stop_ids is None else stop_ids)
        stream = TextStream(self.tokenizer, stop)
        self.generated: list[int] = []
        self.stopped_by = "length"
        self._loop_guard, self._guide = loop_guard, guide
        t0 = time.perf_counter()
        logits = self.feed(list(ids), logits="last") if len(ids) else None
        if logits is None:
            raise ValueError("generate() needs at least one prompt token")
        if self.device.type == "cuda":  # the prompt's time is its own (decode waits for it anyway)
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        # the last call's figures: prompt tokens and seconds to feed them, generated tokens and seconds to decode
        # them, apart from the seconds spent capturing a decode graph (once per state, before the first token)
        self.last_generate = {"prompt_tokens": len(ids), "prompt_s": t1 - t0, "new_tokens": 0, "decode_s": 0.0}
        self._capture_s = 0.0
        try:
            yield from self._sample(logits, max_new_tokens, sampler, eos, stream)
        finally:
            self.last_generate.update(
                new_tokens=len(self.generated),
                decode_s=time.perf_counter() - t1 - self._capture_s,
                capture_s=self._capture_s,
            )

    def _sample(
        self, logits: torch.Tensor, max_new_tokens: int, sampler: Sampler, eos: set[int], stream: TextStream
    ) -> Iterator[str]:
        unknown = self.unknown_ids()
        if self.fast_decode:
            yield from self._generate_on_device(logits, max_new_tokens, sampler, eos, stream, unknown)
            return
        for _ in range(max_new_tokens):
            pieces: list[str] = []
            tok = sampler(self._allowed(logits[-1], unknown))
            stopped = account(tok, eos, stream, self.generated, pieces, self._loop_guard)
            logits = self.feed([tok], logits="last")
            yield from pieces
            if stopped is not None:
                self.stopped_by = stopped
                if stopped == "stop":
                    return
                break
        tail = stream.flush()
        if tail:
            yield tail

    def _allowed(self, row: torch.Tensor, unknown: torch.Tensor | None) -> torch.Tensor:
        """The next token's logits with what may not be sampled at -inf: ids the tokenizer cannot decode, and
        what the guide (if any) forbids here."""
        return allowed(row, unknown, self._guide(self.generated, row.device) if self._guide is not None else None)

    def _generate_on_device(
        self,
        logits: torch.Tensor,
        max_new_tokens: int,
        sampler: Sampler,
        eos: set[int],
        stream: TextStream,
        unknown: torch.Tensor | None,
    ) -> Iterator[str]:
        """generate()'s loop on the decode graph: burst_chunk tokens at a time (GRAPH_CHUNK on a GPU), each chunk
        consumed whole (up to its stop) before its text is yielded, so the state and `generated` agree at every
        yield. Where the guide constrains the next token, the burst ends there and the guided tokens are sampled on
        the host, then a new burst starts."""
        guide, left, seen, stopped = self._guide, max_new_tokens, list(self.generated), None
        with self._changing():
            while left > 0 and stopped is None:
                while left > 0 and stopped is None and guide is not None and guide(seen) is not None:
                    pieces: list[str] = []
                    tok = int(sampler.on_device(self._allowed(logits[-1], unknown)))
                    stopped = account(tok, eos, stream, seen, pieces, self._loop_guard)
                    logits = self.feed([tok], logits="last")
                    self.generated.append(tok)
                    left -= 1
                    yield from pieces
                if left <= 0 or stopped is not None:
                    break
                burst = self._burst(logits, left, sampler, unknown, self.burst_chunk)
                for chunk in burst:
                    keep, pieces = len(chunk), []
                    for j, tok in enumerate(chunk):
                        stopped = account(tok, eos, stream, seen, pieces, self._loop_guard)
                        if stopped is None and guide is not None and guide(seen) is not None:
                            stopped = "guide"  # the next token is constrained: the burst ends here
                        if stopped is not None:
                            keep = j + 1
                            break
                    if keep < len(chunk):
                        burst.keep(keep)
                        sampler.discard(chunk[keep:])
                    self._advance(chunk[:keep])
                    self.generated.extend(chunk[:keep])
                    left -= keep
                    yield from pieces
                    if stopped is not None:
                        break
                if stopped == "guide":
                    stopped, logits = None, self._graph.logits  # after the last token kept
                elif stopped is None:
                    break  # the burst ran to max_new_tokens
        if stopped is not None:
            self.stopped_by = stopped
        if stopped != "stop":
            tail = stream.flush()
            if tail:
                yield tail

    def decode(
        self,
        logits: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chunk: int = GRAPH_CHUNK,
    ) -> list[int]:
        """Sample and feed max_new_tokens ids after `logits` (the last row of the previous feed(), [1, vocab]),
        with no stop condition and no text: generate()'s token loop alone (for benchmarks). On the fast path the
        ids come back to the host every `chunk` tokens; otherwise one feed() per token."""
        sampler = Sampler(temperature, top_p, top_k, seed)
        if not self.fast_decode:
            out = []
            for _ in range(max_new_tokens):
                out.append(sampler(logits[-1]))
                logits = self.feed(out[-1:], logits="last")
            return out
        out = []
        with self._changing():
            for ids in self._burst(logits, max_new_tokens, sampler, None, chunk):
                self._advance(ids)
                out += ids
        return out

    def _burst(self, logits: torch.Tensor, n: int, sampler: Sampler, unknown: torch.Tensor | None, chunk: int) -> Burst:
        graph = self._step_graph()

        def sample(row: torch.Tensor) -> torch.Tensor:
            return sampler.on_device(allowed(row, unknown))

        return Burst(graph, logits.to(self.device), self.tokens_seen, n, sample, chunk)

    def prepare_decode(self) -> None:
        """Build the decode step now (capture, or load or compile it) rather than at the first decode."""
        if self.fast_decode:
            self._step_graph()

    def _step_graph(self) -> DecodeGraph:
        """The decode step bound to this engine's state (captured, or compiled, the first time)."""
        if self._graph is None or not self._graph.bound_to(self.states):
            t0 = time.perf_counter()
            self._graph = None  # drop the old graph (and its memory pool) before capturing a new one
            cuda = self.device.type == "cuda"
            key = (self.fingerprint, self.quant, self.window, self.sink, self.dtype) if self.compile_decode else None
            self._graph = DecodeGraph(self.model, self.states, capture=cuda, aot_key=key)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._capture_s = time.perf_counter() - t0
        return self._graph

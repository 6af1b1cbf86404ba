"""Batched decode for `deltamem serve`: the replies of concurrent requests decoded together, one step for all.

A request's prompt is read on the server's engine, one request at a time (server/app.py); its state is then copied
out (Engine.keep) and joins the decode batch (model/batch.py) as a Reply, which a single decode thread steps with
every other active reply: each step samples one token per reply, feeds them all at once, and streams each reply's
text to its request. A reply leaves the batch when it ends (end of sequence, a stop string, max tokens) with the
state its last token left, which its request gives back to the engine and the prefix cache. Replies join and leave
between steps, so a short request never waits for a long one. A client that goes away ends its reply at the next
step.

Each reply's tokens are those generate() samples on a single stream (the same Sampler, TextStream and stop rules):
on the CPU the host sampler, on a GPU the device sampler, as Engine does.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from deltamem.model.batch import DecodeBatch
from deltamem.model.engine import Kept
from deltamem.model.sampling import Sampler, TextStream, account, allowed

log = logging.getLogger(__name__)
MAX_BATCH = 32  # replies decoded in one step; more wait for a place


@dataclass
class Reply:
    kept: Kept  # the state after the prompt (its tensors move into the batch when it joins)
    logits: torch.Tensor  # [vocab]: the first token's
    sampler: Sampler
    stream: TextStream
    eos: set[int]
    max_new_tokens: int
    guide: Callable[..., torch.Tensor | None] | None = None  # as Engine.generate's (agent/guide.py)
    generated: list[int] = field(default_factory=list)
    stopped_by: str = "length"
    final: Kept | None = None  # the state after the last generated token, once the reply has ended
    cancelled: bool = False
    out: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then None (or an exception)


class Batcher:
    """The decode thread and its batch. submit() a Reply and iterate its text; replies run concurrently."""

    def __init__(self, engine, max_batch: int = MAX_BATCH, capture_lock=None):
        """capture_lock: the lock the engine's users hold (see DecodeBatch)."""
        self.batch = DecodeBatch(engine.model, capture_lock=capture_lock)
        self.unknown = engine.unknown_ids()
        self.on_device = engine.device.type == "cuda"
        self.max_batch = max_batch
        self.waiting: deque[Reply] = deque()
        self.active: list[Reply] = []  # in the batch's row order
        self.steps = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="deltamem-decode", daemon=True)
        self._thread.start()

    def submit(self, reply: Reply) -> Iterator[str]:
        """Queue the reply to decode now; iterate what this returns for its text pieces as they are decoded (when
        the iteration ends, reply.final holds its state)."""
        with self._cond:
            self.waiting.append(reply)
            self._cond.notify()
        return self._pieces(reply)

    @staticmethod
    def _pieces(reply: Reply) -> Iterator[str]:
        try:
            while True:
                item = reply.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reply.cancelled = reply.final is None  # closed early (the client left): the thread drops it

    def close(self) -> None:
        """Stop the decode thread after its current step (a process must not exit while it runs torch ops); replies
        still decoding end with an error."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.waiting or self.active or self._closing)
                if self._closing:
                    for r in [*self.active, *self.waiting]:
                        r.out.put(RuntimeError("the server is shutting down"))
                    self.active, self.waiting = [], deque()
                    return
                joining = []
                while self.waiting and len(self.active) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    self._step(joining)
            except Exception as e:  # the device failed (out of memory, ...): every reply in the batch fails
                log.exception("batched decode failed")
                for r in self.active + [r for r in joining if r not in self.active]:
                    r.out.put(e)
                self.active = []
                self.batch = DecodeBatch(self.batch.model, capture_lock=self.batch.capture_lock)

    def _step(self, joining: list[Reply]) -> None:
        for r in joining:
            self.batch.add(r.kept.states)
            self.active.append(r)
        for row in reversed(range(len(self.active))):  # clients gone: dropped, their states with them
            if self.active[row].cancelled:
                self.batch.remove(row)
                del self.active[row]
        if not self.active:
            return
        tokens = self._sample()
        ended = [self._advance(r, tok) for r, tok in zip(self.active, tokens, strict=True)]  # text out first
        logits = self.batch.step(tokens)  # every sampled token is fed, the last one too (as generate() does)
        self.steps += 1
        for row in reversed(range(len(self.active))):
            r = self.active[row]
            r.logits = logits[row]
            if ended[row]:
                r.final = r.kept.advanced(self.batch.remove(row), r.generated)
                del self.active[row]
                tail = r.stream.flush()
                if tail:
                    r.out.put(tail)
                r.out.put(None)

    def _sample(self) -> list[int]:
        rows = []
        for r in self.active:
            mask = r.guide(r.generated, r.logits.device) if r.guide is not None else None
            rows.append(allowed(r.logits, self.unknown, mask))
        if self.on_device:  # one read-back for the whole batch
            return torch.cat([r.sampler.on_device(x) for r, x in zip(self.active, rows, strict=True)]).tolist()
        return [r.sampler(x) for r, x in zip(self.active, rows, strict=True)]

    @staticmethod
    def _advance(r: Reply, tok: int) -> bool:
        """Account a token sampled for the reply (as Engine.generate does); True when it is the reply's last."""
        pieces: list[str] = []
        stopped = account(tok, r.eos, r.stream, r.generated, pieces)
        for piece in pieces:
            r.out.put(piece)
        if stopped is not None:
            r.stopped_by = stopped
            return True
        return len(r.generated) >= r.max_new_tokens

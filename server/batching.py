"""Continuous batching for `deltamem serve`: one scheduler thread reads prompts a chunk at a time and decodes the
replies of concurrent requests together, the two interleaved.

The thread alternates engine jobs and decode steps. A job is work on the server's engine (reading a request's
prompt), a generator run one step at a time in arrival order: reading a prompt yields after each chunk of `chunk`
tokens (as vLLM's and SGLang's chunked prefill), so the replies already decoding wait at most one chunk between two
steps, and a new request starts as soon as the job before it ends, whatever the replies still decoding. When a
prompt is read its state is copied out (Engine.keep) and joins the decode batch (model/batch.py) as a Reply: each
step samples one token per reply, feeds them all at once, and streams each reply's text to its request. A reply
leaves the batch when it ends (end of sequence, a stop string, max tokens) with the state its last token left,
which its request puts in the prefix cache. A client that goes away ends its reply at the next step.

Each reply's tokens are those generate() samples on a single stream (the same Sampler, TextStream and stop rules):
on the CPU the host sampler, on a GPU the device sampler, as Engine does.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from deltamem.model.batch import DecodeBatch
from deltamem.model.engine import Kept
from deltamem.model.sampling import Sampler, TextStream, account, allowed
from deltamem.server.metrics import Metrics, lap

log = logging.getLogger(__name__)
MAX_BATCH = 32  # replies decoded in one step; more wait for a place
PREFILL_CHUNK = 512  # prompt tokens read between two decode steps (on a CPU)
# on a GPU: at OLMo Hybrid 7B shapes a chunk of 2048 reads in well under 0.1 s, and against 512 it gave 16 clients
# spread over 4 s 1.3x the tokens/s and half the p95 time to first token (H100, benchmarks/serve.py --ramp 4)
GPU_PREFILL_CHUNK = 2048
RESERVE_SHARE = 0.5  # of the device memory free at start, at most, for the decode batch's stacks (on a GPU)


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


@dataclass
class Job:
    """Work on the engine, run by the scheduler thread one step (one next()) at a time while it holds the engine's
    lock; what the generator returns, or raises, is the job's result."""

    steps: Generator[None, None, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Batcher:
    """The scheduler thread: run() engine jobs, submit() replies to decode; both proceed concurrently."""

    def __init__(self, engine, lock, max_batch: int = MAX_BATCH, chunk: int = PREFILL_CHUNK, metrics=None):
        """lock: the engine's lock (server/http.py's FifoLock), held by this thread while a job runs; a decode step
        is captured as a CUDA graph only while no other thread holds it (see DecodeBatch). metrics: where the
        thread's time goes (server/metrics.py; default: a registry of its own)."""
        self.metrics = metrics if metrics is not None else Metrics()
        self.lock = lock
        self.batch = DecodeBatch(engine.model, capture_lock=_CaptureGate(self))
        self.unknown = engine.unknown_ids()
        self.on_device = engine.device.type == "cuda"
        self.max_batch, self.chunk = max_batch, chunk
        self.jobs: deque[Job] = deque()
        self.job: Job | None = None  # the job under way: this thread holds the lock until it ends
        self.waiting: deque[Reply] = deque()
        self.active: list[Reply] = []  # in the batch's row order
        self.steps = 0  # decode steps
        # what the thread did, in order: ("job", replies decoding meanwhile) or ("step", replies in the step)
        self.trace: deque[tuple[str, int]] = deque(maxlen=4096)
        self._holding = False
        self._cond = threading.Condition()
        self._closing = False
        self._engine = engine
        if self.on_device:
            self.max_batch = reserved_rows(engine, max_batch)
            self._reserve()
        self._thread = threading.Thread(target=self._loop, name="deltamem-scheduler", daemon=True)
        self._thread.start()

    def _reserve(self) -> None:
        """On a GPU: the decode batch's stacks at their largest and its step over 1, 2, 4, ... rows captured now,
        not in the middle of a burst of requests (DecodeBatch.reserve)."""
        try:
            self.batch.reserve(self.max_batch, self._engine.keep().states)
        except Exception:  # out of memory, ...: the batch grows as replies come, its graphs captured meanwhile
            log.exception("the decode batch's %d rows could not be made in advance", self.max_batch)
            return
        log.info("decode batch: %d rows made in advance, %d CUDA graphs captured in %.1f s", self.max_batch,
                 self.batch.captures, self.batch.capture_s)  # fmt: skip

    def run(self, steps: Generator[None, None, Any]) -> Job:
        """Queue a job (jobs run one after the other, in this order); job.wait() for its result."""
        job = Job(steps)
        with self._cond:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self.jobs.append(job)
            self._cond.notify()
        return job

    def busy(self) -> bool:
        """Replies decoding or waiting to (read on the scheduler's thread)."""
        return bool(self.active or self.waiting)

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
        """Stop the thread after its current step (a process must not exit while it runs torch ops); jobs not yet
        begun and replies still decoding end with an error."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        t = time.perf_counter()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.job or self.jobs or self.waiting or self.active or self._closing)
                t = lap(self.metrics.scheduler, "idle", t)
                if self._closing:
                    self._shut()
                    return
                if self.job is None and self.jobs:
                    self.job = self.jobs.popleft()
                joining = []
                while self.waiting and len(self.active) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            if self.job is not None:
                self._job_step()
                t = lap(self.metrics.scheduler, "job", t)
            if not (joining or self.active):
                continue
            captured = self.batch.capture_s
            try:
                with torch.inference_mode():
                    self._step(joining)
            except Exception as e:  # the device failed (out of memory, ...): every reply in the batch fails
                log.exception("batched decode failed")
                for r in self.active + [r for r in joining if r not in self.active]:
                    r.out.put(e)
                self.active = []
                self.batch = DecodeBatch(self.batch.model, capture_lock=self.batch.capture_lock)
                if self.on_device:
                    self._reserve()
            captured = max(0.0, self.batch.capture_s - captured)
            self.metrics.scheduler.labels("capture").inc(captured)
            t = lap(self.metrics.scheduler, "decode", t + captured)

    def _job_step(self) -> None:
        job = self.job
        if not self._holding:
            if self.active or self.waiting:  # replies to decode: they do not wait for another thread's use
                if not self.lock.try_acquire():
                    return
            else:
                self.lock.__enter__()
            self._holding = True
        self.trace.append(("job", len(self.active)))
        try:
            with torch.inference_mode():
                next(job.steps)
            return  # more to come, after a decode step
        except StopIteration as e:
            job.result = e.value
        except BaseException as e:  # noqa: BLE001 - the job's caller gets it
            job.error = e
        self.job, self._holding = None, False
        self.lock.release()
        job.done.set()

    def _shut(self) -> None:
        """(Holding the condition.) End everything: the job under way is closed (its generator cleans up), the
        queued ones and the replies fail."""
        gone = RuntimeError("the server is shutting down")
        if self.job is not None:
            self.job.steps.close()
            self.job.error = gone
            self.job.done.set()
            if self._holding:
                self.lock.release()
                self._holding = False
        for job in self.jobs:
            job.error = gone
            job.done.set()
        for r in [*self.active, *self.waiting]:
            r.out.put(gone)
        self.job, self.jobs, self.active, self.waiting = None, deque(), [], deque()

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
        self.trace.append(("step", len(self.active)))
        self.metrics.steps.inc()
        self.metrics.decoded.inc(len(self.active))
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
        if all(r.guide is None and r.sampler.plain_greedy for r in self.active):  # one argmax for the whole batch
            return allowed(torch.stack([r.logits for r in self.active]), self.unknown).argmax(-1).tolist()
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


def reserved_rows(engine, most: int) -> int:
    """The decode batch's rows on a GPU: the largest power of two up to `most` whose states fit in RESERVE_SHARE of
    the device memory free now (at OLMo Hybrid 7B shapes a state is 0.56 GB: 32 rows on an 80 GB card); at least
    one. Replies beyond it wait for a place."""
    free, _ = torch.cuda.mem_get_info(engine.device)
    fit = min(most, int(free * RESERVE_SHARE) // max(1, engine.state_bytes()))
    rows = 1
    while rows * 2 <= fit:
        rows *= 2
    if rows < most:
        log.info("decode batch: %d rows (a reply's state takes %.2f GB; %.1f GB of device memory free)", rows,
                 engine.state_bytes() / 1e9, free / 1e9)  # fmt: skip
    return rows


class _CaptureGate:
    """DecodeBatch's capture lock: the engine's lock, taken only if free; while the scheduler itself holds it for a
    job, no other thread can be using the device, so a capture may go ahead."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def try_acquire(self) -> bool:
        return self.batcher._holding or self.batcher.lock.try_acquire()

    def release(self) -> None:
        if not self.batcher._holding:
            self.batcher.lock.release()

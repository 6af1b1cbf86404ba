"""Decode with every position on the device: one step captured as a CUDA graph, replayed per token.

With bounded attention caches (window set) a decode step is a fixed sequence of kernels over fixed-size
buffers: embed the id in `ids`, run every layer (DeltaNet recurrent step and conv shift written into the
layer's DeltaState in place, KV ring write at the slot of the position in `pos`, attention over the whole
window under a mask computed from `pos`), project to logits, `pos += 1`. DecodeGraph captures that once over
the engine's own state tensors (the ones feed() advances) and replays it; on the CPU it runs the same step
eagerly, which is how the tests check it against feed().

Burst drives the loop: sample on the device (model/sampling.py Sampler.on_device) into `ids`, replay, and copy
the sampled ids to pinned host memory once per `chunk` tokens, the only host sync. A stop found on the host
(eos, stop string) inside a chunk means the device already ran past it: Burst.keep(k) restores what the
chunk overwrote (recurrent/conv states, the ring slots it wrote) and replays only its first k tokens, so the
state has consumed exactly the tokens kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from deltamem.model.cache import DeltaState, KVWindow

log = logging.getLogger(__name__)
WARMUP = 2  # eager steps on a side stream before capture (lazy inits, Triton autotuning)
# Held while a CUDA graph is recorded, and by a thread that uses the device beside the one running the model
# (deltamem serve's prefix writer, copying kept states to the host): a capture that overlaps another thread's device
# calls fails, and fails them.
CAPTURING = threading.Lock()


class DecodeGraph:
    """One decode step of `model` over `states` (a list of DeltaState / KVWindow, bounded windows only).

    `ids` [1] and `pos` [1] (int64, on the model's device) are the step's inputs; `step()` returns the static
    logits [1, vocab] float32. The DeltaStates are switched to in-place updates, so every tensor the graph
    reads stays where it was captured; `bound_to(states)` tells whether that still holds."""

    def __init__(self, model: torch.nn.Module, states: list, capture: bool, aot_key: tuple | None = None):
        """capture: record a CUDA graph (GPU). aot_key (model/aot_step.py package()'s arguments): on the CPU, run
        the step compiled ahead of time, which fuses its small ops and drops their per-op dispatch (the CPU's
        counterpart of capture)."""
        self.model = model
        self.states = list(states)
        self.device = next(model.parameters()).device
        self.kvs = [s for s in self.states if isinstance(s, KVWindow)]
        self.deltas = [s for s in self.states if isinstance(s, DeltaState)]
        if any(kv.window is None for kv in self.kvs):
            raise ValueError("decode graphs need bounded attention caches (window=None grows its buffers)")
        for d in self.deltas:
            d.inplace = True
        with torch.inference_mode(False):  # set by the host outside inference mode too (Burst)
            self.ids = torch.zeros(1, dtype=torch.long, device=self.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.held = self.state_tensors()
        self._run = self.eager_step
        self.compiled = False  # running the step compiled ahead of time
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._saved: list[torch.Tensor] | None = None
        self._saved_kv: list[tuple[torch.Tensor, ...]] = []
        self._start = 0
        if capture:
            self._capture()
        elif aot_key is not None:
            self._run = self._compiled_step(aot_key)

    def state_tensors(self) -> list[torch.Tensor]:
        """The state tensors the step reads and updates in place, in a fixed order (the compiled step's inputs)."""
        out = [t for d in self.deltas for t in (d.conv, d.recurrent)]
        return out + [t for kv in self.kvs for t in (kv.k, kv.v, kv.pos)]

    def bound_to(self, states: list) -> bool:
        """True if `states` are the objects and tensors this step was built on (replaying is then valid)."""
        return (
            len(states) == len(self.states)
            and all(a is b for a, b in zip(states, self.states, strict=True))
            and all(a is b for a, b in zip(self.state_tensors(), self.held, strict=True))
        )

    def _compiled_step(self, aot_key: tuple) -> Callable[[], torch.Tensor]:
        """The step compiled ahead of time for this CPU (model/aot_step.py), or the eager step where it cannot be."""
        from deltamem.model.aot_step import compiled_step

        try:
            step = compiled_step(self, aot_key)
        except Exception as e:  # no C++ compiler, or an op the compiler cannot take
            log.warning("could not compile the decode step (%s: %s); decoding eagerly",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")  # fmt: skip
            return self.eager_step
        self.compiled = True
        return lambda: step(self.ids, self.pos, *self.held)

    def eager_step(self) -> torch.Tensor:
        """One decode step in eager PyTorch on the bound ids, positions and state (what capture and compile trace)."""
        for kv in self.kvs:
            kv.step_pos = self.pos
        try:
            h = self.model.hidden(self.ids, self.states)  # [1, hidden]
            logits = self.model.logits(h).float()  # [1, vocab]
        finally:
            for kv in self.kvs:
                kv.step_pos = None
        self.pos.add_(1)
        return logits

    @torch.inference_mode()
    def _capture(self) -> None:
        # Warm-up steps really run and advance the state: keep a copy and put it back afterwards.
        saved = [t.clone() for t in self.held]
        pos0 = self.pos.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with CAPTURING, torch.cuda.graph(graph):
            logits = self._run()
        for t, s in zip(self.held, saved, strict=True):
            t.copy_(s)
        self.pos.copy_(pos0)
        self.graph, self.logits = graph, logits

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Decode the id in `ids` at position `pos`; advances the state and `pos` (not the host counters)."""
        if self.graph is None:
            self.logits = self._run()
        else:
            self.graph.replay()
        return self.logits

    # --- rollback of a burst's last chunk --------------------------------------------------------------
    @torch.inference_mode()
    def checkpoint(self, start: int, n: int) -> None:
        """Remember what the next n steps (positions start .. start+n-1) overwrite, for rollback()."""
        live = [t for d in self.deltas for t in (d.conv, d.recurrent)]
        if self._saved is None:
            self._saved = [torch.empty_like(t) for t in live]
        for buf, t in zip(self._saved, live, strict=True):
            buf.copy_(t)
        p = torch.arange(start, start + n, device=self.device)
        self._saved_kv = []
        for kv in self.kvs:
            slots = kv.slots(p)
            self._saved_kv.append(
                (slots, kv.k.index_select(1, slots), kv.v.index_select(1, slots), kv.pos.index_select(0, slots))
            )
        self._start = start

    @torch.inference_mode()
    def rollback(self) -> None:
        """Back to the state at the last checkpoint(), `pos` included."""
        live = [t for d in self.deltas for t in (d.conv, d.recurrent)]
        for buf, t in zip(self._saved or [], live, strict=True):
            t.copy_(buf)
        for kv, (slots, k, v, pos) in zip(self.kvs, self._saved_kv, strict=True):
            kv.k.index_copy_(1, slots, k)
            kv.v.index_copy_(1, slots, v)
            kv.pos.index_copy_(0, slots, pos)
        self.pos.fill_(self._start)


class Burst:
    """Sample and decode up to `max_new` tokens from `logits` (the last row of the previous feed, [1, vocab]),
    starting at position `seen`; iterate to get the sampled ids as host lists, `chunk` at a time.

    Each chunk's tokens are already consumed by the state when it is returned; `keep(k)` undoes all but its
    first k and ends the burst. The host counters (tokens seen, token chain) are the caller's to advance."""

    def __init__(
        self,
        graph: DecodeGraph,
        logits: torch.Tensor,
        seen: int,
        max_new: int,
        sample: Callable[[torch.Tensor], torch.Tensor],
        chunk: int = 16,
    ):
        self.g, self.logits, self.seen, self.left, self.sample = graph, logits, seen, max_new, sample
        self.chunk = max(1, min(chunk, max_new)) if max_new > 0 else 1
        dev = graph.device
        self.out = torch.zeros(self.chunk, dtype=torch.long, device=dev)
        cuda = dev.type == "cuda"
        self.host = torch.zeros(self.chunk, dtype=torch.long, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.last: list[int] = []
        graph.pos.fill_(seen)

    def __iter__(self) -> Burst:
        return self

    @torch.inference_mode()
    def __next__(self) -> list[int]:
        if self.left <= 0:
            raise StopIteration
        n = min(self.chunk, self.left)
        if n > 1:  # keep(k) keeps at least one token: a chunk of one is never rolled back
            self.g.checkpoint(self.seen, n)
        logits = self.logits
        for i in range(n):  # no host sync in here: ids stay on the device
            tok = self.sample(logits[-1])  # [1] int64
            self.g.ids.copy_(tok)
            self.out[i : i + 1].copy_(tok)
            logits = self.g.step()
        self.logits = logits
        host = self.host[:n]
        host.copy_(self.out[:n], non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
            self.event.synchronize()
        self.left -= n
        self.seen += n
        self.last = host.tolist()
        return self.last

    @torch.inference_mode()
    def keep(self, k: int) -> None:
        """Keep only the first k ids of the last chunk (rollback, then replay those k) and end the burst."""
        self.left = 0
        n = len(self.last)
        if k >= n:
            return
        self.g.rollback()
        for tok in self.last[:k]:
            self.g.ids.fill_(tok)
            self.g.step()
        self.seen -= n - k

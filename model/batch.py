"""Decode steps for several independent streams at once: `deltamem serve`'s batched decode.

Decode reads every weight once per step whatever the number of rows it multiplies, so B streams decoded in one step
cost little more than one. A step feeds one token to each stream: embeddings, projections, MLPs, norms and the LM
head run on [B, hidden] rows; each Gated DeltaNet layer's states are stacked ([B, ...], model/cache.py's
DeltaStack) for its conv and delta rule; each attention layer's windows too (KVStack), each row attending on its own
window at its own position. The stacks have a fixed number of rows (1, 2, 4, 8, ...: the fewest that hold the
streams), as a serving engine's persistent batch: a stream joining copies its state into a free row, one leaving
copies its row out, and neither disturbs the others or the step's captured CUDA graph. A free row is computed
with the rest (its token 0, its results unread); only growing past the rows rebuilds the stacks.

A stream's state is the per-layer list an Engine holds (Engine.keep() gives a copy): a stream can leave the batch
and go back to an engine (Engine.restore_kept) with its state exactly as the steps left it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from deltamem.model.cache import DeltaStack, DeltaState, KVGroup, KVStack, KVWindow
from deltamem.model.cuda_graph import CAPTURING
from deltamem.model.layers import HybridLM

State = list[DeltaState | KVWindow]
KEEP_ROWS = 4  # stacks of up to this many rows stay when the last stream leaves (with their graph, for the next)
log = logging.getLogger(__name__)


class DecodeBatch:
    """graph_after: on a GPU, once this many steps have run on the current stacks (eager: they also warm up every
    kernel at this row count), the step is captured as a CUDA graph over the stacks and replayed from then on,
    whoever joins or leaves, until the stacks grow. Eager, a 7B step costs tens of milliseconds of kernel launches
    whatever B; replayed, about what its weights take to read (benchmarks/batch_decode.py)."""

    def __init__(self, model: HybridLM, graph_after: int = 2, capture_lock=None):
        """capture_lock: a lock with try_acquire()/release() that every other user of the device holds while it
        runs (deltamem serve's engine lock): a capture must not overlap another thread's device work, or both
        fail. While it is busy the step runs eagerly and the capture waits for a later step."""
        self.model = model
        self.capture_lock = capture_lock
        self.capture_s = 0.0  # seconds spent capturing graphs, so far
        self.device = next(model.parameters()).device
        self.graph_after = graph_after
        self.streams: list[State] = []  # in row order (the caller's rows); their tensors are stale while here
        self.slots: list[int] = []  # the stacks' row of each stream
        self._layers: list[DeltaStack | KVStack | KVGroup] | None = None  # the states as stacks of _rows rows
        self._rows = 0
        self._index: torch.Tensor | None = None
        self._inputs: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_failed = False
        self._steady = 0
        self.graph_steps = 0  # steps replayed from a captured graph (the rest ran eagerly)

    def __len__(self) -> int:
        return len(self.streams)

    def add(self, states: State) -> int:
        """A stream joins with its state (taken over: the caller keeps no reference); returns its row."""
        if len(states) != len(self.model.model.layers):
            raise ValueError(f"a state of {len(states)} layers for a model of {len(self.model.model.layers)}")
        if len(self.streams) == self._rows:
            self._resize(max(1, 2 * self._rows), states)
        slot = min(set(range(self._rows)) - set(self.slots))
        self._put(slot, states)
        self.streams.append(states)
        self.slots.append(slot)
        self._index = None
        return len(self.streams) - 1

    def remove(self, row: int) -> State:
        """Stream `row` leaves (the rows after it move up by one); returns its state as the steps left it."""
        states, slot = self.streams.pop(row), self.slots.pop(row)
        self._index = None
        with torch.inference_mode():
            for layer, st in zip(self._layers, states, strict=True):
                layer.take(slot, st)
        if not self.streams and self._rows > KEEP_ROWS:  # after a burst: the large stacks (and their graph) go
            self._layers, self._rows, self._graph, self._logits, self._inputs = None, 0, None, None, None
        elif self._rows > KEEP_ROWS and len(self.streams) <= self._rows // 4:  # rows mostly free: fewer rows (a
            self._resize(self._rows // 2, None)  # free row's window is read at every step too)
        return states

    @torch.inference_mode()
    def step(self, ids: Sequence[int]) -> torch.Tensor:
        """Feed ids[i] to stream i; returns the next-token logits [B, vocab] (float32)."""
        if len(ids) != len(self.streams) or not ids:
            raise ValueError(f"{len(ids)} ids for {len(self.streams)} streams")
        host = torch.zeros(2, self._rows, dtype=torch.long)  # a free row: token 0 at position 0
        slots = torch.tensor(self.slots)
        host[0, slots] = torch.tensor(list(ids))
        host[1, slots] = torch.tensor([next((st.seen for st in s if isinstance(st, KVWindow)), 0)
                                       for s in self.streams])  # fmt: skip
        if self.device.type == "cuda":  # through pinned memory: the copy does not wait for the device
            host = host.pin_memory()
        self._inputs.copy_(host, non_blocking=True)
        if self._graph is None and self._steady >= self.graph_after and self.device.type == "cuda":
            self._capture()
        if self._graph is not None:
            self._graph.replay()
            logits = self._logits
            self.graph_steps += 1
        else:
            logits = self._run()
        for i in self._stacked:  # the stacked windows' host counters (a KVGroup's windows count their own)
            for s in self.streams:
                s[i].seen += 1
        self._steady += 1
        if self._index is None:  # the streams' rows, on the device (made again when one joins or leaves)
            self._index = slots.to(logits.device)
        return logits.index_select(0, self._index)

    def _run(self) -> torch.Tensor:
        return self.model.logits(self.model.hidden(self._inputs[0], self._layers)).float()

    def _capture(self) -> None:
        """Record the step over the current stacks (the eager steps before it warmed every kernel at this size).
        A model whose step cannot be captured (a host sync inside) stays eager."""
        if self._graph_failed or (self.capture_lock is not None and not self.capture_lock.try_acquire()):
            return
        try:
            if CAPTURING.acquire(blocking=False):  # else a copy beside the model runs: a later step captures
                t0 = time.perf_counter()
                try:
                    self._record()
                finally:
                    CAPTURING.release()
                    self.capture_s += time.perf_counter() - t0
        finally:
            if self.capture_lock is not None:
                self.capture_lock.release()

    def _record(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side), torch.cuda.graph(graph):
                self._logits = self._run()
        except Exception as e:
            log.warning("batched decode stays eager: its step could not be captured (%s: %s)", type(e).__name__, e)
            self._graph_failed = True
            return
        finally:
            torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = graph

    def _put(self, slot: int, states: State) -> None:
        """The stream's state into its row; its own tensors are let go (they would hold their memory for nothing
        while it is in the batch: remove() gives it its row back)."""
        with torch.inference_mode():
            for layer, st in zip(self._layers, states, strict=True):
                layer.put(slot, st)
                if isinstance(st, DeltaState):  # (new empty tensors: a view would keep the storage)
                    st.conv, st.recurrent = st.conv.new_empty(0), st.recurrent.new_empty(0)
                elif not isinstance(layer, KVGroup):
                    st.k, st.v, st.pos = st.k.new_empty(0), st.v.new_empty(0), st.pos.new_empty(0)

    def _resize(self, rows: int, like: State | None) -> None:
        """Stacks of `rows` rows (growing: the rows copied as they are; shrinking: the streams moved to the first
        rows); the graph is captured anew. `like`: a state to shape the stacks on when there are none."""
        old = self._layers
        with torch.inference_mode():
            if old is None:
                layers = [(KVGroup(rows) if st.window is None else KVStack(st, rows)) if isinstance(st, KVWindow)
                          else DeltaStack.empty(st, rows) for st in like]  # fmt: skip
            else:
                layers = [layer.resized(rows) for layer in old]
            self._layers = layers
            if old is not None and rows > self._rows:  # growing: the same rows
                for o, n in zip(old, layers, strict=True):
                    n.copy_rows(o)
            elif old is not None:  # shrinking: each stream to the row of its index
                for k, (slot, s) in enumerate(zip(self.slots, self.streams, strict=True)):
                    for o, st in zip(old, s, strict=True):
                        o.take(slot, st)
                    self._put(k, s)
                self.slots = list(range(len(self.streams)))
        self._rows, self._graph, self._logits, self._index = rows, None, None, None
        self._stacked = [i for i, layer in enumerate(layers) if isinstance(layer, KVStack)]
        self._inputs = torch.zeros(2, rows, dtype=torch.long, device=self.device)  # ids; positions
        for layer in layers:
            if isinstance(layer, KVStack):
                layer.p = self._inputs[1]
        if any(isinstance(layer, KVGroup) for layer in layers):
            self._graph_failed = True  # growing caches: host-side attention, never captured
        self._steady = 0

"""Decode steps for several independent streams at once: `deltamem serve`'s batched decode.

Decode reads every weight once per step whatever the number of rows it multiplies, so B streams decoded in one step
cost little more than one. A step feeds one token to each stream: embeddings, projections, MLPs, norms and the LM
head run on [B, hidden] rows; each Gated DeltaNet layer's states are stacked ([B, ...], model/cache.py's
DeltaStack) for its conv and delta rule; each attention layer's windows too (KVStack), each row attending on its own
window at its own position. As a serving engine's persistent batch: the stacks have a fixed number of rows (a power
of two), the streams always in the first rows (one leaving, the stream of the last row moves into its row), and a
step computes the first B rows only, B the fewest power of two that holds the streams, each B with its own CUDA graph
over those rows of the same stacks: streams joining and leaving, the steps growing and shrinking, neither copies the
stacks nor captures anew. Only more streams than rows grow the stacks (the graphs are captured again over the new
ones); `reserve` makes them at their largest at start, with every graph. A free row inside B is computed with the
rest (its token 0, its results unread).

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
KEEP_ROWS = 4  # stacks of up to this many rows stay when the last stream leaves (with their graphs, for the next)
log = logging.getLogger(__name__)


class DecodeBatch:
    """graph_after: on a GPU, once this many steps over B rows have run eagerly on the current stacks (they also warm
    up every kernel at that size), the step over B rows is captured as a CUDA graph and replayed from then on,
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
        self.slots: list[int] = []  # the stacks' row of each stream: together, rows [0, len(streams))
        self._layers: list[DeltaStack | KVStack | KVGroup] | None = None  # the states as stacks of _rows rows
        self._rows = 0
        self._reserved = 0  # rows reserve() made: kept when the batch empties
        self._index: torch.Tensor | None = None
        self._inputs: torch.Tensor | None = None  # [2, _rows]: ids, positions (a step over B rows reads [:, :B])
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # B -> the step over the first B rows, captured
        self._logits: dict[int, torch.Tensor] = {}  # B -> its graph's output
        self._steady: dict[int, int] = {}  # B -> eager steps over B rows on the current stacks
        self._graph_failed = False
        self.graph_steps = 0  # steps replayed from a captured graph (the rest ran eagerly)
        self.captures = 0  # graphs captured, so far
        self.rows_stepped = 0  # rows the last step computed

    def __len__(self) -> int:
        return len(self.streams)

    def reserve(self, rows: int, like: State) -> None:
        """Make the stacks at least `rows` rows now (a power of two), shaped as the state `like`, and on a GPU
        capture the step over every power of two of rows up to the stacks' rows: a burst of requests then finds
        every graph made. Stacks of up to `rows` rows stay when the batch empties. Only on an empty batch (the
        warm-up steps run on the free rows)."""
        if self.streams:
            raise RuntimeError("reserve() needs an empty batch")
        if rows < 1 or rows & (rows - 1):
            raise ValueError(f"rows must be a power of two; got {rows}")
        if len(like) != len(self.model.model.layers):
            raise ValueError(f"a state of {len(like)} layers for a model of {len(self.model.model.layers)}")
        with torch.inference_mode():
            if self._rows < rows:
                self._grow(rows, like)
            self._reserved = max(self._reserved, rows)
            if self.device.type != "cuda":
                return
            b = self._rows
            while b >= 1:  # largest first
                for _ in range(self.graph_after + 1):  # (a capture that finds its locks busy comes at a later step)
                    if b in self._graphs or self._graph_failed:
                        break
                    self._inputs.zero_()  # token 0 at position 0 in every row: free rows' results, unread
                    self._step_rows(b)
                b //= 2
            torch.cuda.synchronize(self.device)

    def add(self, states: State) -> int:
        """A stream joins with its state (taken over: the caller keeps no reference); returns its row."""
        if len(states) != len(self.model.model.layers):
            raise ValueError(f"a state of {len(states)} layers for a model of {len(self.model.model.layers)}")
        if len(self.streams) == self._rows:
            self._grow(max(1, 2 * self._rows), states)
        slot = len(self.streams)  # the first free row
        self._put(slot, states)
        self.streams.append(states)
        self.slots.append(slot)
        self._index = None
        return len(self.streams) - 1

    def remove(self, row: int) -> State:
        """Stream `row` leaves (the caller's rows after it move up by one); returns its state as the steps left it.
        In the stacks, the stream of the last used row moves into the row it freed."""
        states, slot = self.streams.pop(row), self.slots.pop(row)
        self._index = None
        with torch.inference_mode():
            for layer, st in zip(self._layers, states, strict=True):
                layer.take(slot, st)
            last = len(self.streams)
            if slot != last:
                for layer in self._layers:
                    layer.move(last, slot)
                self.slots[self.slots.index(last)] = slot
        if not self.streams and self._rows > max(KEEP_ROWS, self._reserved):  # after a burst: the large stacks
            self._layers, self._rows, self._inputs = None, 0, None  # (and their graphs) go
            self._graphs, self._logits, self._steady = {}, {}, {}
        return states

    @torch.inference_mode()
    def step(self, ids: Sequence[int]) -> torch.Tensor:
        """Feed ids[i] to stream i; returns the next-token logits [B, vocab] (float32)."""
        if len(ids) != len(self.streams) or not ids:
            raise ValueError(f"{len(ids)} ids for {len(self.streams)} streams")
        b = self._step_size()
        host = torch.zeros(2, b, dtype=torch.long)  # a free row: token 0 at position 0
        slots = torch.tensor(self.slots)
        host[0, slots] = torch.tensor(list(ids))
        host[1, slots] = torch.tensor([next((st.seen for st in s if isinstance(st, KVWindow)), 0)
                                       for s in self.streams])  # fmt: skip
        if self.device.type == "cuda":  # through pinned memory: the copy does not wait for the device
            host = host.pin_memory()
        self._inputs[:, :b].copy_(host, non_blocking=True)
        logits = self._step_rows(b)
        for i in self._stacked:  # the stacked windows' host counters (a KVGroup's windows count their own)
            for s in self.streams:
                s[i].seen += 1
        if self._index is None:  # the streams' rows, on the device (made again when one joins or leaves)
            self._index = slots.to(logits.device)
        return logits.index_select(0, self._index)

    def _step_size(self) -> int:
        """The fewest rows, a power of two, that hold the streams."""
        return min(self._rows, 1 << (len(self.streams) - 1).bit_length())

    def _step_rows(self, b: int) -> torch.Tensor:
        """One step over the first b rows: replayed from its graph, else eagerly (captured after graph_after)."""
        self.rows_stepped = b
        if b not in self._graphs and self._steady.get(b, 0) >= self.graph_after and self.device.type == "cuda":
            self._capture(b)
        if b in self._graphs:
            self._graphs[b].replay()
            self.graph_steps += 1
            return self._logits[b]
        self._steady[b] = self._steady.get(b, 0) + 1
        return self._run(b)

    def _run(self, b: int) -> torch.Tensor:
        layers = [layer.head(b, self._inputs[1, :b]) if isinstance(layer, KVStack) else layer.head(b)
                  for layer in self._layers]  # fmt: skip
        return self.model.logits(self.model.hidden(self._inputs[0, :b], layers)).float()

    def _capture(self, b: int) -> None:
        """Record the step over the first b rows of the current stacks (the eager steps before it warmed every
        kernel at this size). A model whose step cannot be captured (a host sync inside) stays eager."""
        if self._graph_failed or (self.capture_lock is not None and not self.capture_lock.try_acquire()):
            return
        try:
            if CAPTURING.acquire(blocking=False):  # else a copy beside the model runs: a later step captures
                t0 = time.perf_counter()
                try:
                    self._record(b)
                finally:
                    CAPTURING.release()
                    self.capture_s += time.perf_counter() - t0
        finally:
            if self.capture_lock is not None:
                self.capture_lock.release()

    def _record(self, b: int) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side), torch.cuda.graph(graph):
                self._logits[b] = self._run(b)
        except Exception as e:
            log.warning("batched decode stays eager: its step could not be captured (%s: %s)", type(e).__name__, e)
            self._graph_failed = True
            return
        finally:
            torch.cuda.current_stream(self.device).wait_stream(side)
        self._graphs[b] = graph
        self.captures += 1

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

    def _grow(self, rows: int, like: State) -> None:
        """Stacks of `rows` rows, the streams' rows copied as they are; every graph is captured anew. `like`: a
        state to shape the stacks on when there are none."""
        old = self._layers
        with torch.inference_mode():
            if old is None:
                layers = [(KVGroup(rows) if st.window is None else KVStack(st, rows)) if isinstance(st, KVWindow)
                          else DeltaStack.empty(st, rows) for st in like]  # fmt: skip
            else:
                layers = [layer.resized(rows) for layer in old]
                for o, n in zip(old, layers, strict=True):
                    n.copy_rows(o)
        self._layers, self._rows, self._index = layers, rows, None
        self._graphs, self._logits, self._steady = {}, {}, {}
        self._stacked = [i for i, layer in enumerate(layers) if isinstance(layer, KVStack)]
        self._inputs = torch.zeros(2, rows, dtype=torch.long, device=self.device)  # ids; positions
        if any(isinstance(layer, KVGroup) for layer in layers):
            self._graph_failed = True  # growing caches: host-side attention, never captured

"""Decode steps for several independent streams at once: `deltamem serve`'s batched decode.

Decode reads every weight once per step whatever the number of rows it multiplies, so B streams decoded in one step
cost little more than one. A step feeds one token to each stream: embeddings, projections, MLPs, norms and the LM
head run on [B, hidden] rows; each Gated DeltaNet layer's states are stacked ([B, ...], model/cache.py's
DeltaStack) for its conv and delta rule; each attention layer's windows too (KVStack), each row attending on its own
window at its own position. Streams join and leave between steps; the stacks are rebuilt then, not per step.

A stream's state is the per-layer list an Engine holds (Engine.keep() gives a copy): a stream can leave the batch
and go back to an engine (Engine.restore_kept) with its state exactly as the steps left it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from deltamem.model.cache import DeltaStack, DeltaState, KVGroup, KVStack, KVWindow
from deltamem.model.layers import HybridLM

State = list[DeltaState | KVWindow]
log = logging.getLogger(__name__)


class DecodeBatch:
    """graph_after: on a GPU, once the same streams have run this many steps (eager: they also warm up every kernel
    at this batch size), the step is captured as a CUDA graph over the stacks and replayed until a stream joins or
    leaves. Eager, a 7B step costs tens of milliseconds of kernel launches whatever B; replayed, about what its
    weights take to read (benchmarks/batch_decode.py)."""

    def __init__(self, model: HybridLM, graph_after: int = 2, capture_lock=None):
        """capture_lock: a lock with try_acquire()/release() that every other user of the device holds while it
        runs (deltamem serve's engine lock): a capture must not overlap another thread's device work, or both
        fail. While it is busy the step runs eagerly and the capture waits for a later step."""
        self.model = model
        self.capture_lock = capture_lock
        self.device = next(model.parameters()).device
        self.graph_after = graph_after
        self.streams: list[State] = []
        self._layers: list[DeltaStack | KVStack | KVGroup] | None = None  # the states as stacks, while stepping
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_failed = False
        self.graph_steps = 0  # steps replayed from a captured graph (the rest ran eagerly)

    def __len__(self) -> int:
        return len(self.streams)

    def add(self, states: State) -> int:
        """A stream joins with its state (taken over: the caller keeps no reference); returns its row."""
        if len(states) != len(self.model.model.layers):
            raise ValueError(f"a state of {len(states)} layers for a model of {len(self.model.model.layers)}")
        self._unstack()
        self.streams.append(states)
        return len(self.streams) - 1

    def remove(self, row: int) -> State:
        """Stream `row` leaves (the rows after it move up by one); returns its state as the steps left it."""
        self._unstack()
        return self.streams.pop(row)

    @torch.inference_mode()
    def step(self, ids: Sequence[int]) -> torch.Tensor:
        """Feed ids[i] to stream i; returns the next-token logits [B, vocab] (float32; from a captured graph, a
        buffer the next step overwrites)."""
        if len(ids) != len(self.streams) or not ids:
            raise ValueError(f"{len(ids)} ids for {len(self.streams)} streams")
        if self._layers is None:
            self._stack()
        seen = [next((st.seen for st in s if isinstance(st, KVWindow)), 0) for s in self.streams]
        host = torch.tensor([list(ids), seen], dtype=torch.long)
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
        for layer in self._layers:
            if isinstance(layer, KVStack):
                for w in layer.windows:
                    w.seen += 1
        self._steady += 1
        return logits

    def _run(self) -> torch.Tensor:
        return self.model.logits(self.model.hidden(self._inputs[0], self._layers)).float()

    def _capture(self) -> None:
        """Record the step over the current stacks (the eager steps before it warmed every kernel at this size).
        A model whose step cannot be captured (a host sync inside) stays eager."""
        if self._graph_failed or (self.capture_lock is not None and not self.capture_lock.try_acquire()):
            return
        try:
            self._record()
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

    def _stack(self) -> None:
        layers: list[DeltaStack | KVStack | KVGroup] = []
        for i, first in enumerate(self.streams[0]):
            if isinstance(first, KVWindow):
                windows = [s[i] for s in self.streams]
                layers.append(KVGroup(windows) if first.window is None else KVStack(windows))
            else:
                conv = torch.stack([s[i].conv for s in self.streams])
                layers.append(DeltaStack(conv, torch.cat([s[i].recurrent for s in self.streams]).float().contiguous()))
        self._layers = layers
        self._inputs = torch.zeros(2, len(self.streams), dtype=torch.long, device=self.device)  # ids; positions
        for layer in layers:
            if isinstance(layer, KVStack):
                layer.p = self._inputs[1]
        if any(isinstance(layer, KVGroup) for layer in layers):
            self._graph_failed = True  # growing caches: host-side attention, never captured
        self._steady = 0

    def _unstack(self) -> None:
        """Each stream's states get their rows of the stacks back (copies: a stack is freed whole)."""
        if self._layers is None:
            return
        self._graph = None
        with torch.inference_mode():
            for i, layer in enumerate(self._layers):
                if isinstance(layer, DeltaStack):
                    for b, s in enumerate(self.streams):
                        s[i].set(layer.conv[b].clone(), layer.recurrent[b : b + 1].clone())
                else:
                    layer.unstack()
        self._layers = None

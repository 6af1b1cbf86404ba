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

from collections.abc import Sequence

import torch

from deltamem.model.cache import DeltaStack, DeltaState, KVGroup, KVStack, KVWindow
from deltamem.model.layers import HybridLM

State = list[DeltaState | KVWindow]


class DecodeBatch:
    def __init__(self, model: HybridLM):
        self.model = model
        self.device = next(model.parameters()).device
        self.streams: list[State] = []
        self._layers: list[DeltaStack | KVStack | KVGroup] | None = None  # the states as stacks, while stepping

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
        """Feed ids[i] to stream i; returns the next-token logits [B, vocab] (float32)."""
        if len(ids) != len(self.streams) or not ids:
            raise ValueError(f"{len(ids)} ids for {len(self.streams)} streams")
        if self._layers is None:
            self._stack()
        attn = [g for g in self._layers if isinstance(g, KVStack)]
        seen = [next((st.seen for st in s if isinstance(st, KVWindow)), 0) for s in self.streams]
        pos = torch.tensor(seen, dtype=torch.long)
        ids_t = torch.tensor(list(ids), dtype=torch.long)
        if self.device.type == "cuda":  # through pinned memory: the copies do not wait for the device
            pos, ids_t = pos.pin_memory(), ids_t.pin_memory()
        pos = pos.to(self.device, non_blocking=True)
        for g in attn:
            g.p = pos
        h = self.model.hidden(ids_t.to(self.device, non_blocking=True), self._layers)
        return self.model.logits(h).float()

    def _stack(self) -> None:
        layers: list[DeltaStack | KVStack | KVGroup] = []
        for i, first in enumerate(self.streams[0]):
            if isinstance(first, KVWindow):
                windows = [s[i] for s in self.streams]
                layers.append(KVGroup(windows) if first.window is None else KVStack(windows))
            else:
                layers.append(
                    DeltaStack(
                        torch.stack([s[i].conv for s in self.streams]),
                        torch.cat([s[i].recurrent for s in self.streams]).float().contiguous(),
                    )
                )
        self._layers = layers

    def _unstack(self) -> None:
        """Each stream's states get their rows of the stacks back (copies: a stack is freed whole)."""
        if self._layers is None:
            return
        with torch.inference_mode():
            for i, layer in enumerate(self._layers):
                if isinstance(layer, DeltaStack):
                    for b, s in enumerate(self.streams):
                        s[i].set(layer.conv[b].clone(), layer.recurrent[b : b + 1].clone())
                else:
                    layer.unstack()
        self._layers = None

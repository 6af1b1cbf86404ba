"""Per-layer state: Gated DeltaNet's constant-size state and attention's bounded KV window.

KVWindow keeps `sink` first tokens plus a ring buffer of the last `window` tokens (StreamingLLM), preallocated
once; `window=None` is exact full attention in a buffer that grows by doubling. Which keys token p attends to and
which slot holds a position: the window rule, kernels/window.py (visible, ring_slots).

Rotary: StreamingLLM rotates keys by their slot in the cache, so that once tokens are evicted the sink keys sit
just before the window: window keys keep their true distance p - j to the query, sink key i is seen at distance
sink + window - 1 - i. We get the same scores cheaper: keys are stored rotated once at their absolute position
(angles in float64, so precision does not fade with position) and, for the sink keys only, the query is rotated
at min(p, sink + window - 1) instead of p. With no eviction both equal plain absolute positions, so reference
parity holds, and nothing is re-rotated per step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from deltamem import kernels
from deltamem.kernels.window import ring_slots, visible

PAGE = 256  # tokens per snapshot page: the unit the memory store deduplicates
# Keys an attention call sees are padded (with empty, masked slots) to a multiple of this, and on a GPU SDPA is held to
# its memory-efficient or math kernel (`_backends`). Without both, restoring one state and feeding the same tokens
# gave logits up to 0.06 apart from one run to the next at 7B shapes on an H200: a mask of unaligned length is padded
# with uninitialised memory, and the kernel PyTorch otherwise picks for a one-token call over a full window is not
# deterministic (benchmarks/results/gpu_determinism.md: exact with both; decode 164 tok/s against 204 unrestricted).
KEY_ALIGN = 16


class Rotary:
    """Rotate-half RoPE (Hugging Face Llama convention) over the first `dim` dims of each head (partial rotary, as
    Qwen3.5 rotates a quarter of them); the rest pass unchanged. One instance serves every attention layer, so the
    cos/sin of a step's positions are computed once per step, not once per layer."""

    @classmethod
    def of(cls, cfg) -> Rotary | None:
        """The rotary of a model config (None for NoPE models)."""
        return cls(cfg.rotary_dim or cfg.head_dim, cfg.rope_theta) if cfg.rope_theta else None

    def __init__(self, dim: int, theta: float):
        # inv_freq as transformers computes it (float32), used in float64 for the angles.
        self.dim, self.theta = dim, theta
        self.inv_freq = self._inv_freq(torch.device("cpu"))
        self._cached: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._inv_on: dict[torch.device, torch.Tensor] = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        exps = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return (1.0 / self.theta**exps).double()

    def _cos_sin_of(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # an exported step (model/aot_step.py) computes inv_freq in its graph, so it carries no tensor constant
        inv = self._inv_freq(pos.device) if torch.compiler.is_exporting() else self._inv_on.get(pos.device)
        if inv is None:  # one copy per device, made before any CUDA graph capture reads it
            inv = self._inv_on[pos.device] = self.inv_freq.to(pos.device)
        ang = pos.double()[:, None] * inv  # [T, D/2]
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        return torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]

    def _table(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # one (key, table) pair, read and replaced whole: a prefill and a batched decode step may run at once in
        # two threads (deltamem serve), and neither may get the other's table
        key = (int(pos[0]), int(pos[-1]), len(pos), dtype, pos.device)
        cached = self._cached
        if cached is None or cached[0] != key:
            cached = self._cached = (key, self._cos_sin_of(pos, dtype))
        return cached[1]

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D]; pos: [T] int64, consecutive or clamped (the key identifies both)
        return self._apply(x, *self._table(pos, x.dtype))

    def at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The same rotation without the host-side cache key: no device-to-host read of `pos`, so it can run
        inside a CUDA graph, where pos changes between replays."""
        return self._apply(x, *self._cos_sin_of(pos, x.dtype))

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.dim != x.shape[-1]:
            return torch.cat([self._apply(x[..., : self.dim], cos, sin), x[..., self.dim :]], -1)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin


def _copy(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    if device == "pinned":  # host memory the copy engine reads and writes by itself: issued, not waited for
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.clone() if device is None else t.to(device, copy=True)


@dataclass
class DeltaState:
    """Gated DeltaNet layer state: conv [W-1, conv_dim] (model dtype), recurrent [1, HV, DK, DV] float32.

    `inplace`: new values are copied into the existing tensors instead of replacing them, so a captured CUDA
    graph (model/cuda_graph.py), which reads and writes fixed addresses, keeps seeing the live state."""

    conv: torch.Tensor
    recurrent: torch.Tensor
    inplace: bool = False

    def set(self, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        if self.inplace:  # ops given inplace=True already wrote here
            if conv is not self.conv:
                self.conv.copy_(conv)
            if recurrent is not self.recurrent:
                self.recurrent.copy_(recurrent)
        else:
            self.conv, self.recurrent = conv, recurrent

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.conv": self.conv, f"{prefix}.recurrent": self.recurrent}

    def copy(self, device: torch.device | str | None = None) -> DeltaState:
        """An independent copy, on the same device or on `device` ("pinned": in pinned host memory, from a GPU,
        issued on the current stream and not waited for)."""
        return DeltaState(_copy(self.conv, device), _copy(self.recurrent, device))

    def load(self, prefix: str, t: dict[str, torch.Tensor]) -> None:
        conv, rec = t[f"{prefix}.conv"], t[f"{prefix}.recurrent"]
        if conv.shape != self.conv.shape or rec.shape != self.recurrent.shape:
            raise ValueError(f"{prefix}: state shapes {tuple(conv.shape)}, {tuple(rec.shape)} do not fit this model")
        if self.inplace:
            self.conv.copy_(conv)
            self.recurrent.copy_(rec)
            return
        self.conv = conv.to(self.conv.device, self.conv.dtype).clone()
        self.recurrent = rec.to(self.recurrent.device, torch.float32).clone()


@dataclass
class DeltaStack:
    """The DeltaStates of one Gated DeltaNet layer for several independent streams, stacked in rows (model/batch.py):
    conv [B, W-1, conv_dim], recurrent [B, HV, DK, DV] float32. A step feeds one token to each row."""

    conv: torch.Tensor
    recurrent: torch.Tensor

    @classmethod
    def empty(cls, like: DeltaState, rows: int) -> DeltaStack:
        rec = like.recurrent
        return cls(like.conv.new_zeros(rows, *like.conv.shape), rec.new_zeros(rows, *rec.shape[1:]))

    def set(self, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        """In place (a captured step keeps reading and writing the same tensors)."""
        if conv is not self.conv:
            self.conv.copy_(conv)
        if recurrent is not self.recurrent:
            self.recurrent.copy_(recurrent)

    def put(self, row: int, st: DeltaState) -> None:
        self.conv[row].copy_(st.conv)
        self.recurrent[row].copy_(st.recurrent[0])

    def take(self, row: int, st: DeltaState) -> None:
        st.set(self.conv[row].clone(), self.recurrent[row : row + 1].clone())

    def head(self, rows: int) -> DeltaStack:
        """The first `rows` rows, sharing this stack's memory (a step over fewer rows than the stack holds)."""
        return DeltaStack(self.conv[:rows], self.recurrent[:rows])

    def move(self, src: int, dst: int) -> None:
        """Row src's state into row dst (src's is left as it was: free)."""
        self.conv[dst].copy_(self.conv[src])
        self.recurrent[dst].copy_(self.recurrent[src])

    def resized(self, rows: int) -> DeltaStack:
        """An empty stack of the same shapes with `rows` rows."""
        return DeltaStack(self.conv.new_zeros(rows, *self.conv.shape[1:]),
                          self.recurrent.new_zeros(rows, *self.recurrent.shape[1:]))  # fmt: skip

    def copy_rows(self, old: DeltaStack) -> None:
        """Rows [0, len(old)) from a smaller stack (the same rows)."""
        self.conv[: len(old.conv)].copy_(old.conv)
        self.recurrent[: len(old.recurrent)].copy_(old.recurrent)


class KVStack:
    """The bounded KVWindows of one attention layer for several independent streams, stacked (model/batch.py):
    k, v [B, Hkv, cap, D], pos [B, cap]. A step's queries, one row per stream, attend each on its own window at its
    own position `p` ([B] int64 on the device, given by head() to the rows a step reads): the ring write, the masks
    and the scores of all streams in a few batched kernels, no position read back from the device, so a step can be
    captured as a CUDA graph. Same keys and scores as KVWindow._attend_step for each row. put() copies a stream's
    window into a row, take() gives it back; the windows' host counters (`seen`) are the caller's to advance."""

    def __init__(self, like: KVWindow, rows: int):
        """`rows` empty windows shaped as `like`; put() fills a row with a stream's window."""
        if like.window is None:
            raise ValueError("only bounded windows stack (KVGroup serves growing caches)")
        self.sink, self.window, self.rotary = like.sink, like.window, like.rotary
        self.k = like.k.new_zeros(rows, *like.k.shape)
        self.v = like.v.new_zeros(rows, *like.v.shape)
        self.pos = like.pos.new_full((rows, *like.pos.shape), -1)
        self.p: torch.Tensor | None = None

    def put(self, row: int, w: KVWindow) -> None:
        self.k[row].copy_(w.k)
        self.v[row].copy_(w.v)
        self.pos[row].copy_(w.pos)

    def take(self, row: int, w: KVWindow) -> None:
        w.k, w.v, w.pos = self.k[row].clone(), self.v[row].clone(), self.pos[row].clone()

    def head(self, rows: int, p: torch.Tensor) -> KVStack:
        """The first `rows` windows, sharing this stack's memory, attending at positions `p` ([rows] int64)."""
        return self._with(self.k[:rows], self.v[:rows], self.pos[:rows], p)

    def move(self, src: int, dst: int) -> None:
        """Row src's window into row dst (src's is left as it was: free)."""
        self.k[dst].copy_(self.k[src])
        self.v[dst].copy_(self.v[src])
        self.pos[dst].copy_(self.pos[src])

    def resized(self, rows: int) -> KVStack:
        """An empty stack of the same windows with `rows` rows."""
        return self._with(self.k.new_zeros(rows, *self.k.shape[1:]), self.v.new_zeros(rows, *self.v.shape[1:]),
                          self.pos.new_full((rows, *self.pos.shape[1:]), -1), None)  # fmt: skip

    def _with(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, p: torch.Tensor | None) -> KVStack:
        new = object.__new__(KVStack)
        new.sink, new.window, new.rotary = self.sink, self.window, self.rotary
        new.k, new.v, new.pos, new.p = k, v, pos, p
        return new

    def copy_rows(self, old: KVStack) -> None:
        n = len(old.k)
        self.k[:n].copy_(old.k)
        self.v[:n].copy_(old.v)
        self.pos[:n].copy_(old.pos)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, H, D]; k, v: [B, Hkv, D], row i for stream i -> [B, H, D]."""
        b, h, d = q.shape
        p, sink, window = self.p, self.sink, self.window
        q_sink = None
        if self.rotary is not None:  # the rotary's rows are positions: here, each stream's own
            q_sink = self.rotary.at(q, p.clamp(max=sink + window - 1))
            q, k = self.rotary.at(q, p), self.rotary.at(k, p)
        slot = ring_slots(p, sink, window)
        rows = torch.arange(b, device=p.device)
        self.k[rows, :, slot] = k
        self.v[rows, :, slot] = v
        self.pos[rows, slot] = p
        if os.environ.get("DELTAMEM_DECODE_ATTENTION", "sdpa") == "ring":  # each stream's ring read in place
            return kernels.decode_attention(q, self.k, self.v, self.pos, p, sink, window, d**-0.5, q_sink)
        allowed = visible(self.pos, p[:, None], sink, window)  # [B, cap]
        hkv = self.k.shape[1]
        g = h // hkv
        scores = torch.matmul(q.view(b, hkv, g, d), self.k.transpose(2, 3))  # [B, Hkv, G, cap]
        if q_sink is not None and sink:  # sink slots scored with the query rotated at the clamped position
            sink_scores = torch.matmul(q_sink.view(b, hkv, g, d), self.k[:, :, :sink].transpose(2, 3))
            scores = torch.cat([sink_scores, scores[..., sink:]], -1)
        scores = (scores * d**-0.5).float().masked_fill(~allowed[:, None, None, :], float("-inf"))
        out = torch.matmul(scores.softmax(-1).to(self.v.dtype), self.v)  # [B, Hkv, G, D]
        return out.reshape(b, h, d)



class KVGroup:
    """Growing KVWindows (window=None) of one attention layer for several streams: they cannot stack, so each
    stream's row attends on its own window in turn (model/batch.py); a row without a stream gives zeros."""

    def __init__(self, rows: int):
        self.windows: list[KVWindow | None] = [None] * rows

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([w.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1]) if w is not None else
                          torch.zeros_like(q[i : i + 1]) for i, w in enumerate(self.windows)])  # fmt: skip

    def put(self, row: int, w: KVWindow) -> None:
        self.windows[row] = w  # attended in place

    def take(self, row: int, w: KVWindow) -> None:
        self.windows[row] = None

    def head(self, rows: int) -> KVGroup:
        """The first `rows` streams' windows (as they are now: a step's view)."""
        view = KVGroup(0)
        view.windows = self.windows[:rows]
        return view

    def move(self, src: int, dst: int) -> None:
        self.windows[dst], self.windows[src] = self.windows[src], None

    def resized(self, rows: int) -> KVGroup:
        return KVGroup(rows)

    def copy_rows(self, old: KVGroup) -> None:
        self.windows[: len(old.windows)] = old.windows


class KVWindow:
    """Bounded KV cache of one attention layer: slots [0, sink) hold the first tokens, slots [sink, sink+window)
    a ring buffer of the most recent ones. `pos[slot]` is the absolute position held by a slot (-1: empty)."""

    def __init__(
        self,
        n_kv: int,
        head_dim: int,
        sink: int,
        window: int | None,
        rotary: Rotary | None,
        dtype: torch.dtype,
        device: torch.device | str,
        capacity: int = 1024,
    ):
        if (window is not None and window < 1) or sink < 0:
            raise ValueError(f"need window >= 1 or None and sink >= 0, got window={window}, sink={sink}")
        self.sink = sink if window is not None else 0
        self.window = window
        self.rotary = rotary
        cap = _aligned(self.sink + window if window is not None else capacity)
        self.k = torch.zeros(n_kv, cap, head_dim, dtype=dtype, device=device)  # keys, rotated
        self.v = torch.zeros(n_kv, cap, head_dim, dtype=dtype, device=device)
        self.pos = torch.full((cap,), -1, dtype=torch.long, device=device)
        self.seen = 0  # tokens written so far = absolute position of the next token
        # Set (a [1] int64 tensor on the cache's device) only while model/cuda_graph.py runs a decode step:
        # the position of the token being decoded, read on the device instead of from `seen`.
        self.step_pos: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Slots in use: sink + window (the buffers have up to KEY_ALIGN - 1 more, always empty), or the buffer
        length of an unbounded cache."""
        return self.k.shape[1] if self.window is None else self.sink + self.window

    def slots(self, p: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return p
        return ring_slots(p, self.sink, self.window)

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        if cap != self.capacity:
            n = self.capacity
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], cap, old.shape[2])
                new[:, :n] = old
                setattr(self, name, new)
            pos = self.pos.new_full((cap,), -1)
            pos[:n] = self.pos
            self.pos = pos

    def _write(self, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> None:
        if len(p) == 1:  # decode: plain copies into one slot, no index tensors
            n = self.seen
            slot = n if self.window is None else ring_slots(n, self.sink, self.window)
            self.k[:, slot] = k[0]
            self.v[:, slot] = v[0]
            self.pos[slot] = n
            return
        if self.window is not None and len(p) > self.window:  # only the last `window` (and the sinks) survive
            keep = visible(p, p[-1], self.sink, self.window)  # what the last token still sees
            k, v, p = k[keep], v[keep], p[keep]
        s = self.slots(p)
        self.k[:, s] = k.transpose(0, 1)
        self.v[:, s] = v.transpose(0, 1)
        self.pos[s] = p

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write the new keys/values and return attention outputs. q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]."""
        t, h, d = q.shape
        if self.step_pos is not None and t == 1:
            return self._attend_step(q, k, v, self.step_pos)
        p = torch.arange(self.seen, self.seen + t, device=q.device)
        q_sink = None  # queries for the sink keys, once evictions have begun (see module docstring)
        if self.rotary is not None:
            if self.window is not None and self.seen + t > self.sink + self.window:
                q_sink = self.rotary(q, p.clamp(max=self.sink + self.window - 1))
            q, k = self.rotary(q, p), self.rotary(k, p)
        if self.window is None:
            self._grow(self.seen + t)
        write_first = self.window is None or t == 1
        if write_first:
            # Safe to write first: nothing a query here still needs gets overwritten.
            self._write(k, v, p)
            # all of an aligned buffer, or an aligned prefix of a growing one: slots past the tokens are empty
            n = min(_aligned(self.seen + t), self.k.shape[1]) if self.window is None else self.k.shape[1]
            keys, vals, kpos = self.k[:, :n], self.v[:, :n], self.pos[:n]
        else:
            # A long chunk overwrites ring slots its own early queries still read: attend first, then write.
            # On a GPU, padded with empty keys to an aligned length (see KEY_ALIGN). On the CPU, before the ring has
            # filled, only the slots written so far: the empty rest of a large window would cost most of the work.
            filling = not q.is_cuda and self.seen < self.capacity
            old, pad = (self.seen, 0) if filling else (self.k.shape[1], _aligned(t) - t)
            keys = torch.cat([self.k[:, :old], k.transpose(0, 1), self.k.new_zeros(self.k.shape[0], pad, d)], 1)
            vals = torch.cat([self.v[:, :old], v.transpose(0, 1), self.v.new_zeros(self.v.shape[0], pad, d)], 1)
            kpos = torch.cat([self.pos[:old], p, self.pos.new_full((pad,), -1)])
        self.seen += t

        if t == 1 and q_sink is None:  # decode: one fused kernel, no score matrix in Python
            mask = None
            if self.window is not None or keys.shape[1] != self.seen:  # empty slots: an unbounded cache's aligned
                mask = visible(kpos, p, self.sink, self.window)[None]  # prefix, or a ring (evicted keys)
            with _backends(q):
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], keys[None], vals[None], attn_mask=mask, scale=d**-0.5, enable_gqa=True
                )  # [1, H, 1, D]
            return out[0].transpose(0, 1)

        if q.is_cuda and q_sink is None:  # prefill on a GPU: one fused attention kernel with an explicit mask
            out = _sdpa(q, keys, vals, visible(kpos[None, :], p[:, None], self.sink, self.window), d**-0.5)
            if not write_first:
                self._write(k, v, p)
            return out

        hkv, n_keys = keys.shape[0], keys.shape[1]
        g = h // hkv
        scale = d**-0.5

        def grouped(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [Hkv, G*T, D]: GQA without repeating keys
            return x.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)

        # 3-D bmm throughout: broadcasting 5-D matmuls take a slow path on CPU.
        scores = torch.bmm(grouped(q), keys.transpose(1, 2)).view(hkv, g, t, n_keys) * scale
        if q_sink is not None:
            idx = ((kpos < self.sink) & (kpos >= 0)).nonzero()[:, 0]
            sink_scores = torch.bmm(grouped(q_sink), keys[:, idx].transpose(1, 2)) * scale
            scores[..., idx] = sink_scores.view(hkv, g, t, -1)
        allowed = visible(kpos[None, :], p[:, None], self.sink, self.window)
        scores = scores.float().masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1).to(vals.dtype).view(hkv, g * t, n_keys)
        out = torch.bmm(probs, vals).view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, h, d)
        if not write_first:
            self._write(k, v, p)
        return out

    def _attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """One decode token at device-side position p ([1] int64): ring slot, mask and rotary angles are all
        computed on the device, so this runs inside a CUDA graph with no host sync. Same keys and scores as
        attend() with t == 1; `seen` is left to the caller. q: [1, H, D]; k, v: [1, Hkv, D] -> [1, H, D]."""
        if self.window is None:
            raise RuntimeError("device-side decode steps need a bounded window (window=None grows its buffer)")
        h, d = q.shape[1], q.shape[2]
        q_sink = None
        if self.rotary is not None:
            q_sink = self.rotary.at(q, p.clamp(max=self.sink + self.window - 1))
            q, k = self.rotary.at(q, p), self.rotary.at(k, p)
        # Ring write at p's slot and the additive mask [cap] (0: attend, -inf: not): one kernel on the GPU.
        mask = kernels.kv_step(self.k, self.v, self.pos, k[0], v[0], p, self.sink, self.window)
        if os.environ.get("DELTAMEM_DECODE_ATTENTION", "sdpa") == "ring":  # the ring read in place, no mask
            qs = None if q_sink is None else q_sink[0]
            out = kernels.decode_attention(q[0], self.k, self.v, self.pos, p, self.sink, self.window, d**-0.5, qs)
            return out[None]
        if q_sink is None:
            return _sdpa(q, self.k, self.v, mask[None], d**-0.5)
        # Rotary: sink slots [0, sink) are scored with the query rotated at the clamped position.
        hkv = self.k.shape[0]
        g = h // hkv
        scores = torch.bmm(q[0].view(hkv, g, d), self.k.transpose(1, 2))  # [Hkv, G, cap]
        if self.sink:
            sink_scores = torch.bmm(q_sink[0].view(hkv, g, d), self.k[:, : self.sink].transpose(1, 2))
            scores = torch.cat([sink_scores, scores[..., self.sink :]], -1)
        scores = (scores * d**-0.5).float() + mask.float()
        probs = scores.softmax(-1).to(self.v.dtype)
        return torch.bmm(probs, self.v).view(1, h, d)

    # --- snapshot support: fixed-size pages of slots, so unchanged pages hash the same between snapshots ---
    def pages(self) -> int:
        """Pages a snapshot holds: of the sink + window slots, or of the tokens seen in an unbounded cache."""
        return -(-(self.capacity if self.window is not None else self.seen) // PAGE)

    def page(self, j: int) -> torch.Tensor:
        """Page j of the cache: keys and values of its slots, [2, Hkv, <=PAGE, D] (a new tensor)."""
        start, end = self._page_span(j)
        return torch.stack([self.k[:, start:end], self.v[:, start:end]])

    def page_shape(self, j: int) -> tuple[int, ...]:
        start, end = self._page_span(j)
        return (2, self.k.shape[0], end - start, self.k.shape[2])

    def _page_span(self, j: int) -> tuple[int, int]:
        used = self.capacity if self.window is not None else self.seen
        return j * PAGE, min((j + 1) * PAGE, used)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {page_name(prefix, j): self.page(j) for j in range(self.pages())}

    def copy(self, device: torch.device | str | None = None) -> KVWindow:
        """An independent copy, on the same device or on `device` (no decode graph bound to it; "pinned": as
        DeltaState.copy)."""
        new = object.__new__(KVWindow)
        new.__dict__.update(self.__dict__)
        new.k, new.v, new.pos = _copy(self.k, device), _copy(self.v, device), _copy(self.pos, device)
        new.step_pos = None
        return new

    def touched(self, start: int, end: int) -> set[int]:
        """The pages the tokens at positions [start, end) were written to (their ring slots)."""
        spans = []
        if start < self.sink:
            spans.append((start, min(end, self.sink)))
            start = self.sink
        if start < end:
            if self.window is None:
                spans.append((start, end))
            elif end - start >= self.window:
                spans.append((self.sink, self.sink + self.window))
            else:
                first = ring_slots(start, self.sink, self.window)
                last = first + (end - start)
                spans.append((first, min(last, self.sink + self.window)))
                if last > self.sink + self.window:  # wrapped around to the ring's start
                    spans.append((self.sink, last - self.window))
        return {j for a, b in spans for j in range(a // PAGE, (b - 1) // PAGE + 1)}

    def load(self, prefix: str, t: dict[str, torch.Tensor], seen: int) -> None:
        pages = [t[n] for n in sorted(n for n in t if n.startswith(prefix + ".kv."))]
        for page in pages:
            if (
                page.dim() != 4
                or page.shape[0] != 2
                or page.shape[1] != self.k.shape[0]
                or (page.shape[2] and page.shape[3] != self.k.shape[2])
            ):
                raise ValueError(f"{prefix}: KV pages of shape {tuple(page.shape)} do not fit this model")
        used = sum(page.shape[2] for page in pages)
        if self.window is None:
            if used != seen:
                raise ValueError(f"{prefix}: full-attention KV holds {used} tokens, header says {seen}")
            self._grow(max(used, 1))
        elif used != self.capacity:
            raise ValueError(f"KV window holds {used} slots, this engine has {self.capacity}")
        self.k.zero_()
        self.v.zero_()
        at = 0  # page by page straight into the cache (to the GPU too): no joined copy of the whole window
        for page in pages:
            n = page.shape[2]
            self.k[:, at : at + n] = page[0]
            self.v[:, at : at + n] = page[1]
            at += n
        self.seen = seen
        self.pos.fill_(-1)
        p = torch.arange(seen, device=self.pos.device)
        if self.window is not None:
            p = p[visible(p, seen - 1, self.sink, self.window)]  # what the last token seen still sees
        self.pos[self.slots(p)] = p


def page_name(prefix: str, j: int) -> str:
    return f"{prefix}.kv.{j:05d}"


def _aligned(n: int) -> int:
    return -(-n // KEY_ALIGN) * KEY_ALIGN


def _sdpa(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused attention. q: [T, H, D]; keys, vals: [Hkv, N, D]; mask: [T or 1, N] bool (True: attend) -> [T, H, D].
    On CUDA, grouped keys are repeated rather than passed with enable_gqa, which would rule out the
    memory-efficient kernel (the one that takes a mask)."""
    h, hkv = q.shape[1], keys.shape[0]
    gqa = h != hkv
    if gqa and q.is_cuda:  # expand + copy: no repeat counts read back from the device (CUDA-graph safe)
        n, d = keys.shape[1], keys.shape[2]
        keys = keys[:, None].expand(hkv, h // hkv, n, d).reshape(h, n, d)
        vals = vals[:, None].expand(hkv, h // hkv, n, d).reshape(h, n, d)
        gqa = False
    with _backends(q):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], vals[None], attn_mask=mask, scale=scale, enable_gqa=gqa
        )  # [1, H, T, D]
    return out[0].transpose(0, 1)


def _backends(q: torch.Tensor):
    """On a GPU, SDPA may only pick the memory-efficient kernel (or the math one): the one it otherwise picks for a
    one-token call was not deterministic from one call to the next at 7B shapes (see KEY_ALIGN)."""
    if not q.is_cuda:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

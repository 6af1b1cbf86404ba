"""Incremental snapshots: host copies and sha256s of the state's tensors as of the last snapshot, so the next one
copies and hashes only what changed since.

Between two snapshots a turn changes every recurrent state (small beside the attention windows at 7B shapes) and
only the KV pages its tokens were written to (`KVWindow.touched`); the rest of the blob is the same bytes as last
time. `Engine.snapshot_parts()` asks a `PieceCache` for the parts of the current state: the changed tensors are
copied to the host (through pinned memory on a GPU, all copies issued before one wait) and hashed by threads;
the unchanged ones come from the cache, already hashed. The parts join to exactly the bytes `Engine.snapshot()`
makes from scratch, and a store writes only the pieces it lacks.

The cache is valid only while nothing but feeding tokens changed the state: the engine drops it on reset, on a
failed feed or decode, and replaces it on restore (the restored blob's pieces are the cache, so the first save
after a resume is cheap too).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from safetensors.torch import save as st_save

from deltamem.model import snapshot as snap

# Pinned host memory is worth it for what a turn changes, copied again every turn into buffers the caching host
# allocator reuses; a first pinned allocation costs about 2 ms per MB (H200 host), more than it saves on a one-off
# bulk copy, which goes to ordinary memory instead
PINNED_LIMIT = 256 << 20


class PieceCache:
    def __init__(self, tokens_seen: int, pieces: dict[str, tuple[str, torch.Tensor]]):
        self.tokens_seen = tokens_seen  # the state's tokens_seen when these pieces were its tensors
        self.pieces = pieces  # name -> (sha256 hex, host tensor holding its bytes)
        self._head: tuple[tuple, bytes] | None = None  # (layout, safetensors header) of the last parts made
        self._spares: dict[tuple, list[torch.Tensor]] = {}  # (shape, dtype) -> pinned buffers made ahead
        self._warming: threading.Thread | None = None

    def warm(self, specs: list[tuple[tuple[int, ...], torch.dtype]], sets: int = 2) -> None:
        """Make pinned host buffers of these shapes and dtypes in a background thread, `sets` of each, for the
        next snapshots to copy into: a process's first pinned allocations cost about 2 ms per MB (measured on an
        H200 host), which a resumed session's first saves would otherwise pay. (From the third save on, the
        buffers the cache let go of are reused through torch's caching host allocator.)"""

        def allocate() -> None:
            spares: dict[tuple, list[torch.Tensor]] = {}
            for _ in range(sets):
                for shape, dtype in specs:
                    spares.setdefault((tuple(shape), dtype), []).append(
                        torch.empty(shape, dtype=dtype, pin_memory=True)
                    )
            self._spares = spares

        self._warming = threading.Thread(target=allocate, name="deltamem-pinned", daemon=True)
        self._warming.start()

    def parts(
        self, header: dict, names: list[str], changed: set[str], tensor: Callable[[str], torch.Tensor]
    ) -> snap.Parts:
        """The parts of a state of tensors `names`, of which those in `changed` (and any not cached) differ from the
        cache; `tensor(name)` gives one of them (on any device)."""
        fresh = [n for n in names if n in changed or n not in self.pieces]
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        hosts = _to_host([tensor(n) for n in fresh], self._spares)
        for name, host, digest in zip(fresh, hosts, snap.sha256s([_bytes(h) for h in hosts]), strict=True):
            self.pieces[name] = (digest.hex(), host)
        for name in set(self.pieces) - set(names):  # a layout that shrank (never expected): forget the rest
            del self.pieces[name]
        layout = self._layout()
        if self._head is None or self._head[0] != layout:
            self._head = (layout, _st_head(layout, self.pieces))
        st_head = self._head[1]
        order = [name for name, *_ in snap.payload_index(memoryview(st_head))]
        return snap.pack_parts(header, st_head, [(self.pieces[n][0], _bytes(self.pieces[n][1])) for n in order])

    def copy(self) -> PieceCache:
        """The same pieces (host tensors are replaced, never written, so they can be shared), for a kept copy of
        the state they belong to (Engine.keep)."""
        new = PieceCache(self.tokens_seen, dict(self.pieces))
        new._head = self._head
        return new

    @classmethod
    def of_restored(cls, tokens_seen: int, tensors: dict[str, torch.Tensor], pieces: dict) -> PieceCache:
        """The cache of a state just restored from a blob: its tensors (views of the blob), their sha256s and the
        blob's safetensors header (snapshot.unpack's `pieces`), so the next parts need no header made anew."""
        cache = cls(tokens_seen, {n: (pieces["digests"][n], t) for n, t in tensors.items()})
        cache._head = (cache._layout(), pieces["st_head"])
        return cache

    @classmethod
    def of_zeros(cls, tokens_seen: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> PieceCache:
        """The cache of tensors that are all zeros (an empty state's attention pages): one host tensor and one
        sha256 per shape and dtype, shared by every name."""
        made: dict[tuple, tuple[str, torch.Tensor]] = {}
        pieces = {}
        for name, (shape, dtype) in shapes.items():
            if (shape, dtype) not in made:
                host = torch.zeros(shape, dtype=dtype)
                made[shape, dtype] = (snap.sha256s([_bytes(host)])[0].hex(), host)
            pieces[name] = made[shape, dtype]
        return cls(tokens_seen, pieces)

    def _layout(self) -> tuple:
        return tuple(sorted((n, str(t.dtype), tuple(t.shape)) for n, (_, t) in self.pieces.items()))


def _to_host(tensors: list[torch.Tensor], spares: dict[tuple, list[torch.Tensor]]) -> list[torch.Tensor]:
    """Host copies: from a GPU into pinned buffers (`spares` first), every copy queued before one wait; on the host,
    plain copies. A bulk copy (more than PINNED_LIMIT bytes: a session's first save, an ingest's) goes to ordinary
    memory."""
    out = []
    cuda = [t for t in tensors if t.is_cuda]
    pin = sum(t.numel() * t.element_size() for t in cuda) <= PINNED_LIMIT
    for t in tensors:
        if t.is_cuda:
            spare = spares.get((tuple(t.shape), t.dtype)) if pin else None
            host = spare.pop() if spare else torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            host.copy_(t, non_blocking=True)
        else:
            host = t.detach().clone(memory_format=torch.contiguous_format)
        out.append(host)
    if cuda:
        torch.cuda.synchronize(cuda[0].device)
    return out


# layout -> the safetensors header of a payload of that layout: it depends on names, dtypes and shapes only, so it is
# made once per layout and process (every new prompt's first snapshot in `deltamem serve` serialised its whole
# state, about half a GB at 7B shapes, to get it: the writer thread's largest cost in a profile of the server)
# (the few most recent: a growing window's layout changes with every length)
_HEADS: OrderedDict[tuple, bytes] = OrderedDict()
_HEADS_KEPT = 16
_HEADS_LOCK = threading.Lock()


def _st_head(layout: tuple, pieces: dict[str, tuple[str, torch.Tensor]]) -> bytes:
    """The safetensors header of these pieces' payload, by safetensors itself, so the parts join to what snapshot()
    writes (after a restore: the restored blob's, written the same way)."""
    with _HEADS_LOCK:
        head = _HEADS.get(layout)
        if head is not None:
            _HEADS.move_to_end(layout)
            return head
    payload = st_save(_unshared({n: t for n, (_, t) in pieces.items()}))
    (m,) = memoryview(payload)[:8].cast("Q")
    head = payload[: 8 + m]
    with _HEADS_LOCK:
        _HEADS[layout] = head
        while len(_HEADS) > _HEADS_KEPT:
            _HEADS.popitem(last=False)
    return head


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, a copy of each that shares its buffer with one before it (of_zeros' pages), as safetensors
    refuses shared buffers."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        out[name] = t.clone() if t.data_ptr() in seen and t.numel() else t
        seen.add(t.data_ptr())
    return out


def _bytes(t: torch.Tensor) -> memoryview:
    """A host tensor's bytes, without a copy (little-endian as stored: what safetensors writes)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")

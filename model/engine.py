"""The engine: one model, one session state; feed tokens, snapshot, restore, generate."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from deltamem.model import snapshot as snap
from deltamem.model.cache import DeltaState, KVWindow, Rotary, page_name
from deltamem.model.config import LINEAR, ModelConfig
from deltamem.model.cuda_graph import DecodeGraph
from deltamem.model.errors import SnapshotError, resource_error
from deltamem.model.generation import GRAPH_CHUNK, Generation
from deltamem.model.layers import HybridLM
from deltamem.model.packed import dequantized_once, pack
from deltamem.model.snapcache import PieceCache

if TYPE_CHECKING:
    from deltamem.model.tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 512  # load_model's default: bounds activation memory on a CPU
GPU_PREFILL_CHUNK = 4096  # what that default becomes on a GPU, where larger chunks keep the matmuls busy
STEP_FEED = 8  # feed() of at most this many ids goes through a compiled decode step (CPU, --compile)


class Fingerprint:
    """Identifies a model: its config plus a strided sample of every weight as stored in the checkpoint (hashing
    all 15 GB of a 7B model on every load would cost more than it proves), fed tensor by tensor in name order so a
    streaming load needs no whole state dict. Computed before any dtype cast, so a checkpoint has one fingerprint
    whatever dtype or device it runs on."""

    def __init__(self, config: ModelConfig):
        self._h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())

    def add(self, name: str, p: torch.Tensor) -> None:
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        self._h.update(f"{name}:{list(p.shape)}".encode())
        self._h.update(flat[::step].float().cpu().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:32]


def model_fingerprint(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """The Fingerprint of a whole state dict."""
    fp = Fingerprint(config)
    for name, p in sorted(state_dict.items()):
        fp.add(name, p)
    return fp.hexdigest()


def empty_states(
    cfg: ModelConfig, window: int | None, sink: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> list[DeltaState | KVWindow]:
    """The state of a model of this config before its first token: per layer, a DeltaState or a KVWindow."""
    rotary = Rotary.of(cfg)
    states: list[DeltaState | KVWindow] = []
    for layer_type in cfg.layer_types:
        if layer_type == LINEAR:
            conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
                cfg.linear_num_value_heads * cfg.linear_value_head_dim
            )
            shape = (1, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
            states.append(
                DeltaState(
                    conv=torch.zeros(cfg.linear_conv_kernel_dim - 1, conv_dim, dtype=dtype, device=device),
                    recurrent=torch.zeros(shape, dtype=torch.float32, device=device),
                )
            )
        else:
            states.append(KVWindow(cfg.num_key_value_heads, cfg.head_dim, sink, window, rotary, dtype, device))
    return states


@dataclass
class Kept:
    """A state copied where it lives (Engine.keep)."""

    states: list[DeltaState | KVWindow]
    tokens_seen: int
    token_chain: str
    pieces: PieceCache | None  # the incremental snapshot cache as of this state (None: the next one is whole)
    nbytes: int

    def advanced(self, states: list[DeltaState | KVWindow], ids: list[int]) -> Kept:
        """This state continued by `ids`, given the states they left (a stream of model/batch.py's batch)."""
        return Kept(states, self.tokens_seen + len(ids), snap.chain(self.token_chain, ids), self.pieces, self.nbytes)

    def to_host(self) -> Kept:
        """A copy of this state in host memory (what `deltamem serve`'s writer snapshots). From a GPU it goes into
        pinned memory on a stream of its own, after the work already queued: the copy engine moves it while the
        model's kernels go on (a plain copy from a GPU would queue between them and stall decode for its whole
        length). Returns once the copy is done. The caller holds model/cuda_graph.py's CAPTURING."""
        first = self.states[0]
        device = (first.conv if isinstance(first, DeltaState) else first.k).device
        if device.type != "cuda":
            return self._with([st.copy("cpu") for st in self.states])
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            states = [st.copy("pinned") for st in self.states]
        side.synchronize()
        return self._with(states)

    def _with(self, states: list[DeltaState | KVWindow]) -> Kept:
        return Kept(states, self.tokens_seen, self.token_chain, self.pieces, self.nbytes)


class Engine(Generation):
    """Runs a HybridLM over one stream of tokens, keeping per-layer state between calls.

    window/sink bound the attention caches (window=None: exact full attention). prefill_chunk is the number of
    tokens run through the layers at once: it bounds activation memory, not results (on CUDA the default 512
    becomes GPU_PREFILL_CHUNK).

    fast_decode (default: on CUDA with a bounded window) makes generate()/decode() run decode steps through
    model/cuda_graph.py: one step captured as a CUDA graph over this engine's state tensors, sampling on the
    device, the sampled ids read back to the host every GRAPH_CHUNK tokens. Set on a CPU engine it runs the
    same steps eagerly (tests). While a graph is bound, reset() and restore() copy into the live state
    tensors instead of replacing them.
    """

    def __init__(
        self,
        model: HybridLM,
        tokenizer: Tokenizer | None = None,
        window: int | None = None,
        sink: int = 4,
        prefill_chunk: int = 512,
        fingerprint: str | None = None,
        quant: str = "none",
        compile_decode: bool = False,
    ):
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        if sink < 0 or (window is not None and window < 1):
            raise ValueError(f"need sink >= 0 and window >= 1 or None; got sink={sink}, window={window}")
        self.window, self.sink = window, sink
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if self.device.type == "cuda" and prefill_chunk == DEFAULT_PREFILL_CHUNK:
            prefill_chunk = GPU_PREFILL_CHUNK
        self.prefill_chunk = prefill_chunk
        # on the CPU, compile_decode runs decode steps through the same device-side loop, compiled (cuda_graph.py)
        self.compile_decode = compile_decode and self.device.type == "cpu"
        self.fast_decode = (self.device.type == "cuda" or self.compile_decode) and window is not None
        # generate()'s tokens between two reads of their ids: on a GPU a read costs a sync (GRAPH_CHUNK); on a CPU
        # nothing, and a reply's text streams a token at a time (its first piece does not wait for 16 tokens)
        self.burst_chunk = GRAPH_CHUNK if self.device.type == "cuda" else 1
        self._graph: DecodeGraph | None = None
        self._capture_s = 0.0  # seconds the last _burst() spent capturing a decode graph
        # Fingerprint the checkpoint layout once, before packing (a second engine on the model reuses it).
        self.fingerprint = (
            fingerprint or getattr(model, "fingerprint", None) or model_fingerprint(model.config, model.state_dict())
        )
        model.fingerprint = self.fingerprint
        # inference layout (CPU: blocked, optionally quantized, the state_dict is no longer a checkpoint; GPU: fused
        # views); a model packed before keeps its layout
        pack(model, quant=quant)
        self.quant = getattr(model, "quant", quant)
        model.quant = self.quant
        self._zero_pages: PieceCache | None = None  # _empty_pieces(), made at the first reset
        self.reset()

    # --- state -----------------------------------------------------------------------------------------
    def sibling(self) -> Engine:
        """A new engine on the same loaded weights and settings, with an empty state of its own."""
        return Engine(
            self.model,
            self.tokenizer,
            window=self.window,
            sink=self.sink,
            prefill_chunk=self.prefill_chunk,
            fingerprint=self.fingerprint,
            compile_decode=self.compile_decode,
        )

    def reset(self) -> None:
        """Forget everything: back to the state before the first token."""
        self._adopt(self._empty_states())
        self.tokens_seen = 0
        self.token_chain = snap.EMPTY_CHAIN
        self._pieces: PieceCache | None = self._empty_pieces()  # see snapshot_parts()

    def _empty_pieces(self) -> PieceCache:
        """The empty state's snapshot cache: its attention pages are zeros (one shared host tensor and sha256 per
        page shape), so the first snapshot_parts() after a reset copies and hashes only the pages its tokens were
        written to (at OLMo Hybrid 7B shapes a 2k-token prompt's state: about 300 of 560 MB), and the recurrent
        states, which every token changes."""
        if self._zero_pages is None:
            shapes = {}
            for i, st in enumerate(self.states):
                if isinstance(st, KVWindow):
                    for j in range(st.pages()):
                        shapes[page_name(f"layers.{i:03d}", j)] = (st.page_shape(j), st.k.dtype)
            self._zero_pages = PieceCache.of_zeros(0, shapes)
        return self._zero_pages.copy()

    def _adopt(self, states: list[DeltaState | KVWindow]) -> None:
        """Make `states` the current state: copied into the live tensors where a decode graph is bound to
        them (its captured addresses stay valid), else taken as they are."""
        g = self._graph
        if g is None or not g.bound_to(self.states):
            self.states = states
            return
        with torch.inference_mode():
            for live, new in zip(self.states, states, strict=True):
                if isinstance(live, DeltaState):
                    live.conv.copy_(new.conv)
                    live.recurrent.copy_(new.recurrent)
                else:
                    live.k.copy_(new.k)
                    live.v.copy_(new.v)
                    live.pos.copy_(new.pos)
                    live.seen = new.seen

    def _empty_states(self) -> list[DeltaState | KVWindow]:
        return empty_states(self.config, self.window, self.sink, self.dtype, self.device)

    def state_bytes(self) -> int:
        """Bytes of the current state (what a snapshot payload holds, before its small header)."""
        return sum(t.numel() * t.element_size() for t in self._state_tensors().values())

    # --- forward ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def feed(
        self, ids: Sequence[int] | torch.Tensor, logits: Literal["all", "last", "none"] = "all"
    ) -> torch.Tensor | None:
        """Advance the state by `ids`; return their logits [len(ids), vocab] (float32), only the last row
        [1, vocab] with logits="last", or None with logits="none" (e.g. when ingesting)."""
        ids_t = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()  # checks and the chain on the host
        n = ids_t.numel()
        if n == 0:
            raise ValueError("feed() needs at least one token id")
        vocab = self.config.vocab_size
        if int(ids_t.min()) < 0 or int(ids_t.max()) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}); got {int(ids_t.min())}..{int(ids_t.max())}")
        host_ids = ids_t.tolist()
        if self.compile_decode and self.fast_decode and n <= STEP_FEED:
            return self._feed_steps(host_ids, logits)
        ids_t = ids_t.to(self.device)
        outs = []
        several = n > self.prefill_chunk and self.quant != "none"
        with self._changing(), dequantized_once(self.model) if several else contextlib.nullcontext():
            for start in range(0, n, self.prefill_chunk):
                h = self.model.hidden(ids_t[start : start + self.prefill_chunk], self.states)
                if logits == "all":
                    outs.append(self.model.logits(h).float())
                elif logits == "last" and start + self.prefill_chunk >= n:
                    outs.append(self.model.logits(h[-1:]).float())
        self.tokens_seen += n
        self.token_chain = snap.chain(self.token_chain, host_ids)
        return torch.cat(outs) if outs else None

    def _feed_steps(self, ids: list[int], logits: str) -> torch.Tensor | None:
        """feed() of a few ids through the compiled decode step, one at a time: a quantized layer's wide path
        dequantizes every weight first (about 0.1 s on 2 cores), the step reads them quantized (a few ms a token)."""
        g = self._step_graph()
        rows = []
        with self._changing():
            for tok in ids:
                g.ids.fill_(tok)
                g.pos.fill_(self.tokens_seen)
                out = g.step()
                self._advance([tok])
                if logits == "all":
                    rows.append(out.clone())
        return torch.cat(rows) if rows else out.clone() if logits == "last" else None

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Around code that advances the state: if it fails part-way, the state is no longer what the host
        counters say, and the next snapshot_parts() must start from scratch. (A generator closed at a yield is
        not a failure: the state and the counters agree there.)"""
        try:
            yield
        except GeneratorExit:
            raise
        except BaseException:
            self._pieces = None
            raise

    # --- snapshots -------------------------------------------------------------------------------------
    def state_sizes(self) -> dict[str, int]:
        """Bytes of the state by kind: "recurrent" (the DeltaNet layers' state and conv windows) and "kv" (the
        attention layers' bounded caches)."""
        out = {"recurrent": 0, "kv": 0}
        for i, st in enumerate(self.states):
            kind = "kv" if isinstance(st, KVWindow) else "recurrent"
            out[kind] += sum(t.numel() * t.element_size() for t in st.tensors(f"layers.{i:03d}").values())
        return out

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, st in enumerate(self.states):
            out.update(st.tensors(f"layers.{i:03d}"))
        return out

    def _header(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "arch": self.config.arch,
            "dtype": str(self.dtype).removeprefix("torch."),
            "window": self.window,
            "sink": self.sink,
            "tokens_seen": self.tokens_seen,
            "token_chain": self.token_chain,
        }

    def snapshot(self) -> bytes:
        """The whole state as bytes (see model/snapshot.py); restore() continues from it exactly."""
        return snap.pack(self._header(), self._state_tensors())

    def snapshot_parts(self) -> snap.Parts:
        """The same snapshot as snapshot(), as the parts a store keeps (bytes(parts) == snapshot()), made
        incrementally: only the tensors changed since the last snapshot_parts() or restore() are copied to the
        host and hashed (model/snapcache.py), the rest come from the previous parts."""
        names, changed, where = [], set(), {}
        cache = self._pieces
        since = cache.tokens_seen if cache is not None else None
        for i, st in enumerate(self.states):
            prefix = f"layers.{i:03d}"
            if isinstance(st, KVWindow):
                touched = st.touched(since, self.tokens_seen) if since is not None else set()
                for j in range(st.pages()):
                    name = page_name(prefix, j)
                    names.append(name)
                    where[name] = (st, j)
                    if j in touched:
                        changed.add(name)
            else:
                for name, t in st.tensors(prefix).items():
                    names.append(name)
                    where[name] = t
                    if since != self.tokens_seen:
                        changed.add(name)

        def tensor(name: str) -> torch.Tensor:
            w = where[name]
            return w[0].page(w[1]) if isinstance(w, tuple) else w

        if cache is None:
            cache = PieceCache(self.tokens_seen, {})
        with torch.inference_mode():
            parts = cache.parts(self._header(), names, changed, tensor)
        cache.tokens_seen = self.tokens_seen
        self._pieces = cache
        return parts

    def keep(self) -> Kept:
        """A copy of the current state where it lives (on a GPU, in device memory), for restore_kept(): one
        device-side copy back, no host round trip, no hashing. What `deltamem serve` keeps of hot prompt states."""
        with torch.inference_mode():
            states = [st.copy() for st in self.states]
        return Kept(states, self.tokens_seen, self.token_chain, self.piece_cache(), self.state_bytes())

    def piece_cache(self) -> PieceCache | None:
        """A copy of the incremental snapshot cache as of the current state (what keep() carries; see
        snapshot_parts)."""
        return self._pieces.copy() if self._pieces is not None else None

    def restore_kept(self, kept: Kept, copy: bool = True) -> None:
        """Back to a state keep() copied (the copy stays as it was, to be restored again; copy=False: its tensors
        become the engine's, for a copy made to be restored once)."""
        with torch.inference_mode():
            self._adopt([st.copy() for st in kept.states] if copy else list(kept.states))
        self.tokens_seen, self.token_chain = kept.tokens_seen, kept.token_chain
        self._pieces = kept.pieces.copy() if kept.pieces is not None else None

    def restore(self, blob: bytes | Sequence[bytes], convert_dtype: bool = False) -> str | None:
        """Replace the state by a snapshot's (its bytes, or the parts Store.load_snapshot(joined=False) gives).
        Refuses, leaving the state as it was, a blob of another model, another window/sink, an unknown format
        version, or a truncated or corrupted blob. A blob taken on another device restores exactly; one of another
        dtype is refused unless `convert_dtype`, which casts it (not exact). Returns the blob's dtype if it was
        converted, else None."""
        pieces: dict = {}
        header, tensors = snap.unpack(blob, pieces)
        mine = self._header()
        if header.get("fingerprint") != mine["fingerprint"]:
            raise SnapshotError(
                f"snapshot was taken with another model (fingerprint {header.get('fingerprint')}, "
                f"this model is {mine['fingerprint']}); load the model the session was created with"
            )
        for key in ("window", "sink"):
            if header.get(key) != mine[key]:
                raise SnapshotError(
                    f"snapshot has {key}={header.get(key)!r}, this engine runs {key}={mine[key]!r}; "
                    f"load the model with the same setting to resume it"
                )
        converted = None
        if header.get("dtype") != mine["dtype"]:
            if not convert_dtype or header.get("dtype") not in ("float32", "bfloat16", "float16"):
                raise SnapshotError(
                    f"snapshot state is {header.get('dtype')}, this engine runs {mine['dtype']}: load the model "
                    f"with --dtype {header.get('dtype')} to resume it exactly, or pass --convert-state to convert it "
                    "(the continuation is then not exact)"
                )
            converted = header["dtype"]
        seen, chain = header.get("tokens_seen"), header.get("token_chain")
        if type(seen) is not int or seen < 0:
            raise SnapshotError("snapshot header has no valid tokens_seen")
        if not isinstance(chain, str) or not re.fullmatch("[0-9a-f]{64}", chain):
            raise SnapshotError("snapshot header has no valid token_chain")
        # Load into fresh states and swap everything in at the end: a refused blob changes nothing.
        # (With a decode graph bound, "swap in" is a copy into the live tensors: see _adopt.)
        try:
            states = self._empty_states()
            for i, st in enumerate(states):
                prefix = f"layers.{i:03d}"
                if isinstance(st, KVWindow):
                    st.load(prefix, tensors, seen)
                else:
                    st.load(prefix, tensors)
        except (KeyError, ValueError) as e:  # a tensor missing or of the wrong shape: the blob's fault
            raise SnapshotError(f"snapshot state does not fit this model: {e!r}") from e
        except Exception as e:  # the blob checked out (hash, shapes): memory or the device failed, not the blob
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            err = resource_error(e, f"to restore a snapshot of {size:,} bytes on {self.device}")
            if err is None:
                raise
            raise err from e
        self._adopt(states)
        self.tokens_seen, self.token_chain = seen, chain
        # the blob's pieces are the state's: the next snapshot_parts() copies and hashes only what changes after
        self._pieces = PieceCache.of_restored(seen, tensors, pieces) if converted is None and pieces else None
        if self.device.type == "cuda" and self._pieces is not None:
            # what a turn changes (every recurrent state, about two pages per window): pinned host buffers for them,
            # made while the turn runs
            turn = [(t.shape, t.dtype) for n, t in tensors.items() if n.endswith((".conv", ".recurrent"))]
            turn += [(t.shape, t.dtype) for n, t in tensors.items() if n.endswith(".kv.00000") for _ in range(2)]
            self._pieces.warm(turn)
        return converted

    def _advance(self, ids: list[int]) -> None:
        """Host counters after decode steps ran on the device: tokens seen, each window's count, the chain."""
        self.tokens_seen += len(ids)
        for st in self.states:
            if isinstance(st, KVWindow):
                st.seen += len(ids)
        self.token_chain = snap.chain(self.token_chain, ids)

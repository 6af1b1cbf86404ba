"""Snapshot blob format: the whole model state as one self-checking byte string.

    b"DMSNAP\\n"  |  u32 little-endian header length  |  JSON header (utf-8)  |  safetensors payload

The header carries `format` (version), `fingerprint` (model), `dtype`, `window`, `sink`, `tokens_seen`,
`token_chain` (chained sha256 of every token id consumed), `shapes` (tensor name -> shape), `payload_bytes`,
and `sha256`, so a flipped bit anywhere is caught: from format 2 it is the sha256 of the rest of the header
(canonical JSON) followed by the sha256 of the payload's index and of each tensor's bytes, so threads hash a large
state in parallel and a store can hand the tensors over in its pieces, unjoined (format 1, still read, hashed
header and payload as one stream). The payload is a plain safetensors file whose tensors are the per-layer states,
decoded as views of the blob (no copy: restore copies them into place);
attention windows come as fixed-size pages, each its own tensor, so a store can split a payload at tensor
boundaries and deduplicate unchanged pages without knowing the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as st_save

from deltamem.model.errors import SnapshotError

MAGIC = b"DMSNAP\n"
FORMAT_VERSION = 2
READS = (1, 2)
# safetensors dtype names -> torch (the ones a state can hold)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def pack(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    payload = memoryview(st_save({n: t.detach().contiguous().cpu() for n, t in tensors.items()}))
    header = dict(header)
    header.update(
        format=FORMAT_VERSION,
        shapes={n: list(t.shape) for n, t in sorted(tensors.items())},
        payload_bytes=len(payload),
    )
    _, st_head, datas = _layout(payload)
    header["sha256"] = _digest(header, st_head, datas)[0]
    hb = json.dumps(header, sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<I", len(hb)), hb, payload])


@dataclass(frozen=True)
class Parts:
    """A snapshot in the parts a store keeps: `prefix` (magic, header and the payload's safetensors header) and,
    in payload order, each tensor's bytes with its sha256 (hex). `bytes(parts)` is the blob; the store writes
    only the pieces it does not have yet (Engine.snapshot_parts hashes a piece once, when it changed)."""

    prefix: bytes
    pieces: list[tuple[str, memoryview]]

    def __bytes__(self) -> bytes:
        return b"".join([self.prefix, *(d for _, d in self.pieces)])

    @property
    def nbytes(self) -> int:
        return len(self.prefix) + sum(len(d) for _, d in self.pieces)


def pack_parts(header: dict[str, Any], st_head: bytes, pieces: list[tuple[str, memoryview]]) -> Parts:
    """Parts of the blob pack() would make of the same tensors, from the payload's safetensors header and each
    tensor's bytes and sha256 in payload order (hashed by the caller, who knows which changed)."""
    index = payload_index(memoryview(st_head))
    header = dict(header)
    header.update(
        format=FORMAT_VERSION,
        shapes={name: shape for name, _, shape, _ in index},
        payload_bytes=len(st_head) + sum(len(d) for _, d in pieces),
    )
    leaves = [hashlib.sha256(st_head).digest(), *(bytes.fromhex(h) for h, _ in pieces)]
    header["sha256"] = _digest_of(header, leaves)
    hb = json.dumps(header, sort_keys=True).encode()
    return Parts(b"".join([MAGIC, struct.pack("<I", len(hb)), hb, st_head]), pieces)


def read_header(blob: bytes) -> tuple[dict[str, Any], int]:
    """Parse and check the header; returns it and the payload offset. Does not hash the payload."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SnapshotError(f"a snapshot is bytes, got {type(blob).__name__}")
    blob = memoryview(blob)
    if blob[: len(MAGIC)] != MAGIC or len(blob) < len(MAGIC) + 4:
        raise SnapshotError("not a deltamem snapshot (bad magic bytes)")
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    if start + n > len(blob):
        raise SnapshotError("snapshot is truncated (header cut short)")
    try:
        header = json.loads(bytes(blob[start : start + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"snapshot header is corrupt: {e}") from e
    if not isinstance(header, dict) or "format" not in header:
        raise SnapshotError("snapshot header is corrupt: no format version")
    if type(header["format"]) is not int or header["format"] not in READS:
        raise SnapshotError(
            f"snapshot format version {header['format']!r} is not supported by this deltamem "
            f"(it reads versions {', '.join(map(str, READS))}); upgrade deltamem or re-create the session"
        )
    return header, start + n


def unpack(blob: bytes | Sequence[bytes], pieces: dict | None = None):
    """Check magic, version, length and sha256, then decode the tensors and check their shapes.

    `blob` is the snapshot's bytes, or the same bytes in parts as memory/pieces.py splits them: [everything up to
    the first tensor's bytes, then each tensor's bytes in payload order] (a store need not join a large state).
    The tensors are read-only views of those bytes (no copy): copy them before writing into them. Returns
    (header, {name: tensor}); a dict passed as `pieces` receives, for format 2, "digests" (each tensor's sha256,
    hex) and "st_head" (the payload's safetensors header bytes): what an incremental snapshot starts from."""
    whole = isinstance(blob, bytes | bytearray | memoryview)
    if not whole and not (isinstance(blob, Sequence) and blob and not isinstance(blob, str)):
        raise SnapshotError(f"a snapshot is bytes, got {type(blob).__name__}")
    parts = [memoryview(blob)] if whole else [memoryview(p) for p in blob]
    header, off = read_header(parts[0])
    size = sum(map(len, parts)) - off
    if size != header.get("payload_bytes"):
        raise SnapshotError(
            f"snapshot is truncated or padded: payload has {size} bytes, header says {header.get('payload_bytes')}"
        )
    index, st_head, datas = _layout(parts[0][off:], None if whole else parts[1:])
    digest, leaves = _digest(header, st_head, datas)
    if digest != header.get("sha256"):
        raise SnapshotError("snapshot is corrupt: its sha256 does not match its header and payload")
    if pieces is not None and leaves:
        pieces["digests"] = {name: leaf.hex() for (name, _, _), leaf in zip(index, leaves[1:], strict=True)}
        pieces["st_head"] = bytes(st_head)
    tensors = {}
    with warnings.catch_warnings():  # a bytes blob is read-only; these views are only read
        warnings.simplefilter("ignore", UserWarning)
        for (name, dtype, shape), data in zip(index, datas, strict=True):
            flat = torch.frombuffer(data, dtype=dtype) if len(data) else torch.empty(0, dtype=dtype)
            tensors[name] = flat.view(shape)
    shapes = {n: list(t.shape) for n, t in tensors.items()}
    if shapes != header.get("shapes"):
        raise SnapshotError("snapshot payload tensors do not match the shapes in its header")
    return header, tensors


def payload_index(st_head: memoryview) -> list[tuple[str, torch.dtype, list[int], tuple[int, int]]]:
    """A safetensors header's tensors [(name, dtype, shape, (start, end))] in byte order, checked to lie end to end.
    (The format is simple: an 8-byte length, a JSON index of dtype/shape/offsets, then the tensors' bytes.)"""
    (n,) = struct.unpack_from("<Q", st_head, 0)
    if len(st_head) < 8 + n:
        raise ValueError("its header is cut short")
    spans = json.loads(bytes(st_head[8 : 8 + n]))
    index, pos = [], 0
    for (a, b), name, spec in sorted((v["data_offsets"], k, v) for k, v in spans.items() if k != "__metadata__"):
        dtype, shape = _DTYPES[spec["dtype"]], [int(d) for d in spec["shape"]]
        if a != pos or b - a != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} at bytes {a}..{b} does not follow the previous one or fit its shape")
        index.append((name, dtype, shape, (a, b)))
        pos = b
    return index


def _layout(payload: memoryview, datas: list[memoryview] | None = None):
    """A safetensors payload's index [(name, dtype, shape)] in byte order, its header bytes and each tensor's bytes.

    With `datas` the payload is only its header and the tensors' bytes come separately, one buffer each.
    (safetensors.torch.load copies every tensor twice, most of a large restore's time.)"""
    try:
        full = payload_index(payload)
        (n,) = struct.unpack_from("<Q", payload, 0)
        st_head = payload[: 8 + n]
        index = [(name, dtype, shape) for name, dtype, shape, _ in full]
        offsets = [span for *_, span in full]
        end = offsets[-1][1] if offsets else 0
        if datas is None:
            body = payload[8 + n :]
            if len(body) != end:
                raise ValueError(f"{len(body)} bytes of tensors, the index describes {end}")
            datas = [body[a:b] for a, b in offsets]
        elif len(payload) != 8 + n or [len(d) for d in datas] != [b - a for a, b in offsets]:
            raise ValueError("its parts do not match the index")
        return index, st_head, datas
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise SnapshotError(f"snapshot is corrupt: its payload is not a valid safetensors file: {e}") from e


def _digest(header: dict[str, Any], st_head: memoryview, datas: list[memoryview]) -> tuple[str, list[bytes]]:
    """Format 1: sha256 of the canonical header JSON then the payload. Format 2: of the JSON, then the sha256 of
    the payload's index and of each tensor's bytes (hashed by threads: hashlib lets go of the GIL). Returns the
    digest and those leaf digests (none for format 1)."""
    parts = [st_head, *datas]
    if header.get("format") == 1:
        return _digest_of(header, parts), []
    leaves = sha256s(parts)
    return _digest_of(header, leaves), leaves


def _digest_of(header: dict[str, Any], chunks: Sequence[bytes | memoryview]) -> str:
    """sha256 of the header's canonical JSON (its own sha256 left out), then of each chunk in turn."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def sha256s(datas: Sequence[memoryview | bytes]) -> list[bytes]:
    """The sha256 digest of each buffer; threads share a large batch (hashlib lets go of the GIL)."""
    if sum(map(len, datas)) < 1 << 20 or len(datas) < 2:
        return [hashlib.sha256(p).digest() for p in datas]
    with ThreadPoolExecutor(min(len(datas), os.cpu_count() or 1, 16)) as pool:
        return list(pool.map(lambda p: hashlib.sha256(p).digest(), datas))


def chain(prev: str, ids: list[int]) -> str:
    """Extend a chained hash by token ids, one link per token, so any chunking of the same ids agrees."""
    h = bytes.fromhex(prev)
    for i in ids:
        h = hashlib.sha256(h + int(i).to_bytes(4, "little")).digest()
    return h.hex()


EMPTY_CHAIN = hashlib.sha256(b"deltamem-tokens").hexdigest()

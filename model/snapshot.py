"""Snapshot blob format: the whole model state as one self-checking byte string.

    b"DMSNAP\\n"  |  u32 little-endian header length  |  JSON header (utf-8)  |  safetensors payload

The header carries `format` (version), `fingerprint` (model), `dtype`, `window`, `sink`, `tokens_seen`,
`token_chain` (chained sha256 of every token id consumed), `shapes` (tensor name -> shape), `payload_bytes`,
and `sha256` over the rest of the header (canonical JSON) followed by the payload, so a flipped bit anywhere is
caught. The payload is a plain safetensors file whose tensors are the per-layer states;
attention windows come as fixed-size pages, each its own tensor, so a store can split a payload at tensor
boundaries and deduplicate unchanged pages without knowing the model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.errors import SnapshotError

MAGIC = b"DMSNAP\n"
FORMAT_VERSION = 1


def pack(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    payload = st_save({n: t.detach().contiguous().cpu() for n, t in tensors.items()})
    header = dict(header)
    header.update(
        format=FORMAT_VERSION,
        shapes={n: list(t.shape) for n, t in sorted(tensors.items())},
        payload_bytes=len(payload),
    )
    header["sha256"] = _digest(header, payload)
    hb = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(hb)) + hb + payload


def read_header(blob: bytes) -> tuple[dict[str, Any], int]:
    """Parse and check the header; returns it and the payload offset. Does not hash the payload."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SnapshotError(f"a snapshot is bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise SnapshotError("not a deltamem snapshot (bad magic bytes)")
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    if start + n > len(blob):
        raise SnapshotError("snapshot is truncated (header cut short)")
    try:
        header = json.loads(blob[start : start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"snapshot header is corrupt: {e}") from e
    if not isinstance(header, dict) or "format" not in header:
        raise SnapshotError("snapshot header is corrupt: no format version")
    if type(header["format"]) is not int or header["format"] != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot format version {header['format']!r} is not supported by this deltamem "
            f"(it reads version {FORMAT_VERSION}); upgrade deltamem or re-create the session"
        )
    return header, start + n


def unpack(blob: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Check magic, version, length and sha256, then decode the tensors and check their shapes."""
    header, off = read_header(blob)
    payload = bytes(blob[off:])
    if len(payload) != header.get("payload_bytes"):
        raise SnapshotError(
            f"snapshot is truncated or padded: payload has {len(payload)} bytes, header says "
            f"{header.get('payload_bytes')}"
        )
    if _digest(header, payload) != header.get("sha256"):
        raise SnapshotError("snapshot is corrupt: its sha256 does not match its header and payload")
    try:
        tensors = st_load(payload)
    except Exception as e:  # safetensors raises its own error types
        raise SnapshotError(f"snapshot payload is not a valid safetensors file: {e}") from e
    shapes = {n: list(t.shape) for n, t in tensors.items()}
    if shapes != header.get("shapes"):
        raise SnapshotError("snapshot payload tensors do not match the shapes in its header")
    return header, tensors


def _digest(header: dict[str, Any], payload: bytes) -> str:
    rest = {k: v for k, v in header.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True).encode())
    h.update(payload)
    return h.hexdigest()


def chain(prev: str, ids: list[int]) -> str:
    """Extend a chained hash by token ids, one link per token, so any chunking of the same ids agrees."""
    h = bytes.fromhex(prev)
    for i in ids:
        h = hashlib.sha256(h + int(i).to_bytes(4, "little")).digest()
    return h.hex()


EMPTY_CHAIN = hashlib.sha256(b"deltamem-tokens").hexdigest()

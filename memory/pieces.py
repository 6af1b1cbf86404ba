"""Split a snapshot blob into content-addressed pieces and join them back, reading only its headers.

A snapshot blob (model/snapshot.py) is `b"DMSNAP\\n" | u32 len | JSON header | safetensors payload`, and a
safetensors payload is `u64 len | JSON header | tensor bytes`, tensors laid end to end at the offsets the JSON
gives. Each tensor's bytes become one piece, keyed by sha256: a turn that changes the recurrent state and one
page of the attention window stores those and references the unchanged pages it already has. memory/ knows
nothing of models: it relies only on these two framings.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MAGIC = b"DMSNAP\n"


class BlobError(ValueError):
    """Bytes that are not a snapshot blob this store can split, or pieces that do not join back."""


@dataclass(frozen=True)
class Split:
    header: dict  # the snapshot's own JSON header (fingerprint, tokens_seen, sha256, ...)
    prefix: bytes  # everything before the tensor bytes: magic, header, safetensors header
    pieces: list[tuple[str, bytes]]  # (sha256 hex, bytes) in payload order


def split(blob: bytes) -> Split:
    header, data_start, spans = _frame(blob)
    pos = 0
    datas = []
    for a, b in spans:
        if a != pos or b < a or data_start + b > len(blob):
            raise BlobError("snapshot payload is truncated or its tensors are not laid end to end")
        datas.append(blob[data_start + a : data_start + b])
        pos = b
    pieces = list(zip(hashes(datas), datas, strict=True))
    if data_start + pos != len(blob):
        raise BlobError("snapshot has trailing bytes after its tensors")
    return Split(header, blob[:data_start], pieces)


def from_parts(prefix: bytes, pieces: list[tuple[str, bytes]]) -> Split:
    """A snapshot already in parts (model/snapshot.py's Parts: its prefix, and each tensor's bytes with the sha256
    its maker computed once), checked against the framing: every piece has the length the payload's index gives.
    The digests are taken as given (the blob's own sha256 covers them; load verifies each piece)."""
    header, data_start, spans = _frame(prefix)
    if data_start != len(prefix):
        raise BlobError("a snapshot's prefix ends where its tensors begin")
    if [b - a for a, b in spans] != [len(d) for _, d in pieces]:
        raise BlobError("snapshot pieces do not match the lengths in its payload index")
    for digest, _ in pieces:
        if not isinstance(digest, str) or len(digest) != 64:
            raise BlobError(f"snapshot piece digest {digest!r} is not a sha256")
    return Split(header, bytes(prefix), list(pieces))


def _frame(blob: bytes) -> tuple[dict, int, list[tuple[int, int]]]:
    """The snapshot header, where its tensor bytes start, and each tensor's (start, end) in payload order."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise BlobError("not a deltamem snapshot")
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(blob[start : start + n])
        (m,) = struct.unpack_from("<Q", blob, start + n)
        st_start = start + n + 8
        st_header = json.loads(blob[st_start : st_start + m])
    except (ValueError, struct.error) as e:
        raise BlobError(f"snapshot headers are corrupt: {e}") from e
    spans = sorted((tuple(v["data_offsets"]) for k, v in st_header.items() if k != "__metadata__"), key=lambda s: s[0])
    return header, st_start + m, spans


def join(prefix: bytes, pieces: list[tuple[str, bytes]]) -> bytes:
    """Reassemble a blob, checking every piece against its hash."""
    verify(pieces)
    return b"".join([prefix, *(d for _, d in pieces)])


def verify(pieces: list[tuple[str, bytes]]) -> None:
    """Check every (sha256, bytes) piece; large ones are hashed by threads."""
    for digest, actual in zip((d for d, _ in pieces), hashes([data for _, data in pieces]), strict=True):
        if actual != digest:
            raise BlobError(f"stored snapshot piece {digest[:12]} is corrupt (hash mismatch)")


def hashes(datas: list[bytes], parallel_from: int = 1 << 20) -> list[str]:
    """sha256 hex digests; hashlib lets go of the GIL, so threads hash a large snapshot's pieces in parallel."""
    if sum(map(len, datas)) < parallel_from or len(datas) < 2:
        return [hashlib.sha256(d).hexdigest() for d in datas]
    with ThreadPoolExecutor(min(len(datas), os.cpu_count() or 1, 16)) as pool:
        return list(pool.map(lambda d: hashlib.sha256(d).hexdigest(), datas))

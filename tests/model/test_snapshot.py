"""Every bad blob gets its own clear error, and a refused restore leaves the state untouched."""

import json
import struct

import pytest
import torch

from deltamem.model import SnapshotError, load_model
from deltamem.model.snapshot import MAGIC
from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid

VOCAB = 320


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    make_olmo_hybrid(a, vocab=VOCAB, seed=0, **OLMO_SHAPES["olmo_gqa_rope"])
    make_olmo_hybrid(b, vocab=VOCAB, seed=1, **OLMO_SHAPES["olmo_gqa_rope"])  # same shapes, other weights
    return a, b


@pytest.fixture()
def engine_and_blob(dirs):
    eng = load_model(dirs[0], window=16, sink=2)
    eng.feed(torch.arange(40) % VOCAB)
    return eng, eng.snapshot()


def refuses(eng, blob, match):
    """Restore must raise with `match`, and the state must be exactly what it was."""
    before = eng.snapshot()
    with pytest.raises(SnapshotError, match=match):
        eng.restore(blob)
    assert eng.snapshot() == before


def rewrite_header(blob, **changes):
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(blob[start : start + n])
    header.update(changes)
    hb = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(hb)) + hb + blob[start + n :]


def test_round_trip_restores_counters(engine_and_blob, dirs):
    eng, blob = engine_and_blob
    other = load_model(dirs[0], window=16, sink=2)
    other.restore(blob)
    assert (other.tokens_seen, other.token_chain) == (40, eng.token_chain)
    assert torch.equal(other.feed([5, 6]), eng.feed([5, 6]))


def test_blob_of_another_model(engine_and_blob, dirs):
    eng, _ = engine_and_blob
    stranger = load_model(dirs[1], window=16, sink=2)
    stranger.feed([1, 2, 3])
    refuses(eng, stranger.snapshot(), "another model")


def test_truncated_blob(engine_and_blob):
    eng, blob = engine_and_blob
    for cut in (len(blob) - 1, len(blob) // 2, 30, 5):
        refuses(eng, blob[:cut], "truncated|bad magic|corrupt")
    refuses(eng, blob[: len(blob) // 2], "truncated")


@pytest.mark.parametrize("where", ["payload_start", "payload_middle", "payload_end"])
def test_bit_flip_in_payload(engine_and_blob, where):
    eng, blob = engine_and_blob
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4 + n
    pos = {"payload_start": start + 3, "payload_middle": (start + len(blob)) // 2, "payload_end": len(blob) - 1}
    flipped = bytearray(blob)
    flipped[pos[where]] ^= 0x10
    refuses(eng, bytes(flipped), "corrupt")


def test_bit_flip_in_header(engine_and_blob):
    eng, blob = engine_and_blob
    flipped = bytearray(blob)
    flipped[len(MAGIC) + 6] ^= 0x01  # inside the JSON
    refuses(eng, bytes(flipped), "corrupt|another model|tokens_seen|format")


def test_unknown_format_version(engine_and_blob):
    eng, blob = engine_and_blob
    refuses(eng, rewrite_header(blob, format=99), "format version 99")


def test_other_window_or_dtype(engine_and_blob, dirs):
    eng, _ = engine_and_blob
    for kwargs, match in [(dict(window=32, sink=2), "window=32"), (dict(window=16, sink=2, dtype=torch.bfloat16),
                                                                   "state is bfloat16, this engine runs float32")]:
        other = load_model(dirs[0], **kwargs)
        other.feed([1, 2, 3])
        refuses(eng, other.snapshot(), match)


def test_not_a_snapshot(engine_and_blob):
    eng, _ = engine_and_blob
    refuses(eng, b"PK\x03\x04 a zip file", "bad magic")
    with pytest.raises(SnapshotError, match="bytes"):
        eng.restore("a string")


def test_two_engines_on_one_model_share_identity(engine_and_blob):
    from deltamem.model import Engine

    eng, blob = engine_and_blob
    twin = Engine(eng.model, window=16, sink=2)  # the model is already packed: same fingerprint, no re-pack
    assert twin.fingerprint == eng.fingerprint
    twin.restore(blob)
    assert torch.equal(twin.feed([7]), eng.feed([7]))


def resealed(blob, drop_tensor=None, **changes):
    """A blob whose hashes are valid but whose header disagrees with its tensors (a buggy or hostile writer)."""
    from deltamem.model.snapshot import pack, unpack

    header, tensors = unpack(blob)
    header = {k: v for k, v in header.items() if k not in ("format", "shapes", "payload_bytes", "sha256")}
    header.update(changes)
    if drop_tensor:
        tensors.pop(sorted(n for n in tensors if drop_tensor in n)[0])
    return pack(header, tensors)


def test_self_consistent_but_wrong_blobs(engine_and_blob, dirs):
    eng, blob = engine_and_blob
    refuses(eng, resealed(blob, drop_tensor=".kv."), "does not fit")
    refuses(eng, resealed(blob, drop_tensor=".recurrent"), "does not fit")
    refuses(eng, resealed(blob, token_chain=123), "token_chain")
    refuses(eng, resealed(blob, tokens_seen=True), "tokens_seen")
    full = load_model(dirs[0], window=None)
    full.feed(torch.arange(28) % VOCAB)
    refuses(full, resealed(full.snapshot(), tokens_seen=3), "holds 28 tokens, header says 3")
    refuses(full, resealed(full.snapshot(), tokens_seen=5000), "holds 28 tokens")


def test_negative_sink_is_refused(dirs):
    with pytest.raises(ValueError, match="sink >= 0"):
        load_model(dirs[0], window=4, sink=-1)


def _split_payload(blob):
    """Independent reading of the layout: header JSON, safetensors index bytes, tensors' bytes in offset order."""
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    header, payload = json.loads(blob[start : start + n]), blob[start + n :]
    (m,) = struct.unpack_from("<Q", payload, 0)
    index = json.loads(payload[8 : 8 + m])
    spans = sorted(v["data_offsets"] for k, v in index.items() if k != "__metadata__")
    return header, payload, payload[: 8 + m], [payload[8 + m + a : 8 + m + b] for a, b in spans]


def _sealed(header, payload, digest):
    header = dict(header, sha256=digest)
    hb = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(hb)) + hb + payload


def test_digest_is_the_documented_tree_of_sha256s(engine_and_blob):
    import hashlib

    eng, blob = engine_and_blob
    header, _, st_head, datas = _split_payload(blob)
    rest = {k: v for k, v in header.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True).encode())
    for part in (st_head, *datas):
        h.update(hashlib.sha256(part).digest())
    assert header["format"] == 2 and header["sha256"] == h.hexdigest()


def test_format_1_blobs_still_restore(engine_and_blob, dirs):
    """A blob of the first format (one sha256 over header JSON and payload) from an older deltamem."""
    import hashlib

    eng, blob = engine_and_blob
    header, payload, _, _ = _split_payload(blob)
    header = {k: v for k, v in header.items() if k != "sha256"} | {"format": 1}
    v1 = _sealed(header, payload, hashlib.sha256(json.dumps(header, sort_keys=True).encode() + payload).hexdigest())
    other = load_model(dirs[0], window=16, sink=2)
    other.restore(v1)
    assert torch.equal(other.feed([5, 6]), eng.feed([5, 6]))
    refuses(other, v1[:-1] + bytes([v1[-1] ^ 1]), "corrupt")


def test_restore_from_parts_and_a_bad_part(engine_and_blob, dirs):
    eng, blob = engine_and_blob
    _, payload, st_head, datas = _split_payload(blob)
    parts = [blob[: len(blob) - len(payload) + len(st_head)], *datas]
    assert b"".join(parts) == blob
    other = load_model(dirs[0], window=16, sink=2)
    other.restore(parts)
    assert torch.equal(other.feed([5, 6]), eng.feed([5, 6]))
    bad = list(parts)
    bad[2] = bytes([bad[2][0] ^ 4]) + bad[2][1:]
    refuses(other, bad, "corrupt")
    refuses(other, [parts[0], *parts[2:]], "truncated")
    refuses(other, [parts[0], parts[2], parts[1], *parts[3:]], "corrupt|do not match")


def test_index_with_overlapping_tensors_is_refused(engine_and_blob):
    """Hashes valid, but the safetensors index points two tensors at the same bytes: refused, not misread."""
    import hashlib

    eng, blob = engine_and_blob
    header, payload, st_head, datas = _split_payload(blob)
    (m,) = struct.unpack_from("<Q", payload, 0)
    index = json.loads(payload[8 : 8 + m])
    names = sorted((v["data_offsets"], k) for k, v in index.items() if k != "__metadata__")
    index[names[1][1]]["data_offsets"] = index[names[0][1]]["data_offsets"]
    ib = json.dumps(index).encode()
    new_payload = struct.pack("<Q", len(ib)) + ib + payload[8 + m :]
    header = dict(header, payload_bytes=len(new_payload))
    rest = {k: v for k, v in header.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True).encode())
    for part in (new_payload[: 8 + len(ib)], *datas):
        h.update(hashlib.sha256(part).digest())
    refuses(eng, _sealed(header, new_payload, h.hexdigest()), "does not follow|not a valid safetensors")

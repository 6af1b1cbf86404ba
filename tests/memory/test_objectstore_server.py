"""obstore against the real S3 gateway of tests/objectstore.py, configured by the environment alone: objects of a
few MB (one above obstore's multipart threshold) put, listed, read back byte-identical and deleted; a missing key
is FileNotFoundError."""

import os

import obstore
import pytest
from obstore.store import from_url

pytest_plugins = ["tests.objectstore"]  # the `s3` fixture

MB = 1 << 20


def test_put_list_get_delete(s3):
    store = from_url(s3.url("t"))
    blobs = {"a.bin": os.urandom(1 * MB), "b/c.bin": os.urandom(3 * MB + 17), "d.bin": os.urandom(6 * MB + 1)}
    for key, data in blobs.items():
        obstore.put(store, key, data)

    def listed():
        return {m["path"]: m["size"] for batch in obstore.list(store) for m in batch}

    assert listed() == {k: len(v) for k, v in blobs.items()}
    assert bytes(obstore.get(store, "d.bin").bytes()) == blobs["d.bin"]
    obstore.delete(store, "a.bin")
    assert listed() == {k: len(v) for k, v in blobs.items() if k != "a.bin"}
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "a.bin")

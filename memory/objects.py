"""Snapshot pieces in object storage (`--objects file://DIR` or `s3://BUCKET/PREFIX`), through obstore.

With an object store the database keeps each piece's row (sha256, bytes, the object's key) and the object store its
bytes, so several machines can share the pieces of one set of sessions. Each upload goes to a key of its own,
`pieces/AB/SHA256-TOKEN`, never overwritten, which makes the protocol safe without any lock beyond the database's:

- a writer uploads a piece it needs and the database lacks (or holds only as 'deleting') to a new key, then, in the
  same transaction as the snapshot that uses it, inserts (or takes over) the piece's row with that key: a turn is
  visible only once its pieces are durable;
- gc marks unreferenced pieces 'deleting' in one transaction; once it commits, it deletes the objects of the rows
  still 'deleting', then those rows if they still hold that key (a writer that took a row over in between gave it
  a new key and made it live again: the sweep leaves it alone);
- an object no row names (an upload whose transaction never committed, a crash; the old object of a row a writer
  took over) is deleted by gc once it is older than `ORPHAN_GRACE_S`, longer than any writer holds an upload
  before its commit; gc looks only under its own database's folder, `pieces/DBID/`, so databases sharing a bucket
  never collect each other's pieces (nothing is shared between them: each writes its own).

S3 settings come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ALLOW_HTTP for a plain-HTTP endpoint such as a local gateway); obstore reads no ~/.aws files.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from deltamem.memory.errors import StoreError

ENV_OBJECTS = "DELTAMEM_OBJECTS"
ORPHAN_GRACE_S = 3600.0
PARALLEL = 8  # uploads and downloads at once (an object store's latency, not its bandwidth, bounds one at a time)


def _env_bool(name: str) -> bool | None:
    v = os.environ.get(name)
    return None if v is None else v.strip().lower() in ("1", "true", "yes", "on")


def normal_url(url: str) -> str:
    """The URL as a database records it: no trailing slash (s3://b/p and s3://b/p/ are one store)."""
    return url.rstrip("/") if "://" in url and len(url.rstrip("/")) > len(url.split("://")[0]) + 3 else url


class Objects:
    """An object store for snapshot pieces: put under a fresh key, get, delete, list. `space`: the database's own
    folder in it (its id), so databases sharing a bucket never sweep each other's pieces."""

    def __init__(self, url: str, space: str = ""):
        self.space = space
        try:
            import obstore
            from obstore.store import LocalStore, S3Store
        except ImportError as e:  # an optional dependency: only a store with objects needs it
            raise StoreError(f"--objects {url} needs obstore: pip install 'deltamem[cluster]'") from e
        self.url, self._ob = url, obstore
        u = urlparse(url)
        if u.scheme == "file":
            root = Path(u.path)
            if not u.path or u.netloc or not root.is_absolute():
                raise StoreError(f"{url}: a file URL is file:///absolute/folder")
            try:
                root.mkdir(parents=True, exist_ok=True)
                self.store = LocalStore(root)
            except Exception as e:  # OSError, obstore's errors
                raise StoreError(f"cannot use the object folder {root}: {e}") from e
        elif u.scheme == "s3":
            if not u.netloc:
                raise StoreError(f"{url}: an S3 URL is s3://BUCKET or s3://BUCKET/PREFIX")
            config = {}
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                config["endpoint"] = endpoint
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                config["region"] = region
            allow_http = _env_bool("AWS_ALLOW_HTTP")
            if allow_http is None and endpoint:
                allow_http = endpoint.startswith("http://")
            try:
                self.store = S3Store(u.netloc, prefix=u.path.strip("/") or None, config=config,
                                     client_options={"allow_http": bool(allow_http)})  # fmt: skip
            except Exception as e:  # obstore's configuration errors
                raise StoreError(f"cannot use the object store {url}: {e}") from e
        else:
            raise StoreError(f"--objects takes file:///FOLDER or s3://BUCKET/PREFIX, not {url!r}")

    def new_key(self, digest: str) -> str:
        return f"{self.prefix}{digest[:2]}/{digest}-{secrets.token_hex(16)}"

    @property
    def prefix(self) -> str:
        return f"pieces/{self.space}/" if self.space else "pieces/"

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> dict[str, str]:
        """Upload (digest, bytes) pairs, each to a new key; returns digest -> key once every one is stored."""
        items = list(items)
        keys = {d: self.new_key(d) for d, _ in items}

        def put(item: tuple[str, bytes]) -> None:
            self._ob.put(self.store, keys[item[0]], item[1])

        self._each(put, items, "store pieces in")
        return keys

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The objects' bytes, in order (None where one is missing)."""

        def get(key: str) -> bytes | None:
            try:
                return bytes(self._ob.get(self.store, key).bytes())
            except FileNotFoundError:
                return None

        return self._each(get, keys, "read pieces from")

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete these objects (those already gone count as deleted); returns how many were asked."""
        keys = list(keys)

        def delete(key: str) -> None:
            try:
                self._ob.delete(self.store, key)
            except FileNotFoundError:
                pass

        self._each(delete, keys, "delete pieces from")
        return len(keys)

    def listing(self) -> Iterator[tuple[str, float]]:
        """Every piece object: (key, its age in seconds)."""
        now = dt.datetime.now(dt.UTC)
        try:
            for batch in self._ob.list(self.store, prefix=self.prefix):
                for meta in batch:
                    yield meta["path"], (now - meta["last_modified"]).total_seconds()
        except FileNotFoundError:  # a local folder not made yet
            return
        except Exception as e:  # obstore's network and permission errors
            raise StoreError(f"cannot list the pieces in the object store {self.url}: {e}") from e

    def _each(self, fn, items: list, what: str) -> list:
        if not items:
            return []
        try:
            if len(items) == 1:
                return [fn(items[0])]
            with ThreadPoolExecutor(min(PARALLEL, len(items))) as pool:
                return list(pool.map(fn, items))
        except StoreError:
            raise
        except Exception as e:  # obstore's network and permission errors
            raise StoreError(f"cannot {what} the object store {self.url}: {e}") from e

"""The start-up cache: what loading a model computes from its source files (the default model's GGUF parsed, its
delta dequantised and merged; the tokenizer's ranks), kept once under the user's cache directory so that later
loads memory-map it instead of converting again.

An entry is a safetensors file of float32 weights plus a JSON file: the source files' paths, sizes, modification
times and sha256s (the key), the model's fingerprint, its config, the tokenizer (model/tokenizer.py to_json) and the
source's metadata. On use the sources are checked (size + mtime, and their sha256 when those changed: a touched but
identical file is still a hit), and the weights against the fingerprint as they load; a stale or damaged entry is
rebuilt, and a cache that cannot be written (read-only, full disk) is only logged. DELTAMEM_CACHE moves the cache;
DELTAMEM_CACHE=off disables it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
VERSION = 1


def cache_root() -> Path | None:
    """$DELTAMEM_CACHE, else $XDG_CACHE_HOME/deltamem, else ~/.cache/deltamem; None when set to "off"."""
    env = os.environ.get("DELTAMEM_CACHE")
    if env:
        return None if env.lower() in ("off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deltamem"


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _entry_name(name: str, sources: list[Path]) -> str:
    key = hashlib.sha256(json.dumps([name, VERSION, [str(p.resolve()) for p in sources]]).encode()).hexdigest()
    return f"{name}-{key[:16]}"


def load(name: str, sources: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The entry for `sources`: (weights file, its JSON), or None (absent, stale, unreadable, or the cache is off).
    A source whose size or mtime moved is hashed: the entry still serves if its content did not change."""
    root = cache_root()
    if root is None:
        return None
    base = root / _entry_name(name, sources)
    weights, meta_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != VERSION or not weights.is_file() or weights.stat().st_size != meta["weights_bytes"]:
            return None
        for src, rec in zip(sources, meta["sources"], strict=True):
            now = _stat(src)
            if (now["size"], now["mtime_ns"]) != (rec["size"], rec["mtime_ns"]) and _sha256(src) != rec["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return weights, meta


def store(name: str, sources: list[Path], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the entry atomically (temp files + rename: a crash leaves no half entry); failures are logged only."""
    from safetensors.torch import save_file

    root = cache_root()
    if root is None:
        return
    base = root / _entry_name(name, sources)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, tmp)
            record = {
                "version": VERSION,
                "sources": [{**_stat(p), "sha256": _sha256(p)} for p in sources],
                "weights_bytes": Path(tmp).stat().st_size,
                **meta,
            }
            os.replace(tmp, base.with_suffix(".safetensors"))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, base.with_suffix(".json"))
    except OSError as e:
        log.warning("could not write the start-up cache in %s (%s); the next load converts again", root, e)
        return
    _prune(root, name)


def _prune(root: Path, name: str) -> None:
    """Remove `name`'s entries whose source files are gone (an upgraded package, a deleted delta): each is a whole
    float32 copy of a model, and nothing would ever load it again."""
    for meta_path in root.glob(f"{name}-*.json"):
        try:
            sources = [Path(rec["path"]) for rec in json.loads(meta_path.read_text())["sources"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged, or being written: load() rebuilds it
        if not all(p.exists() for p in sources):
            _remove(meta_path.with_suffix(""))


def drop(name: str, sources: list[Path]) -> None:
    """Remove an entry found damaged (it is rebuilt on this load)."""
    root = cache_root()
    if root is None:
        return
    _remove(root / _entry_name(name, sources))


def _remove(base: Path) -> None:
    """Delete an entry's two files (its JSON first: without it the weights are never read)."""
    for p in (base.with_suffix(".json"), base.with_suffix(".safetensors")):
        try:
            p.unlink()
        except OSError:
            pass

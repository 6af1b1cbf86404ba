"""Session memory in SQLite: sessions, turns, content-addressed snapshots, the ingest ledger, recall (memory.store)."""

from deltamem.memory.errors import CorruptSnapshot, NotFound, SchemaError, StoreError
from deltamem.memory.store import Store, default_db_path

__all__ = ["CorruptSnapshot", "NotFound", "SchemaError", "Store", "StoreError", "default_db_path"]

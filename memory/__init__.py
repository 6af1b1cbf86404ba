"""Session memory in SQLite: sessions, turns, content-addressed snapshots, the ingest ledger, recall.

memory.store.Store is the one entry point; its parts live one concept a module (sessions, snapshots, retention,
leases, ledger, transfer), schema history in migrations.py.
"""

from deltamem.memory.errors import CorruptSnapshot, NotFound, SchemaError, StoreError
from deltamem.memory.store import Store, default_db_path

__all__ = ["CorruptSnapshot", "NotFound", "SchemaError", "Store", "StoreError", "default_db_path"]

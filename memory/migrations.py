"""Versioned schema migrations, append-only (llm's habit): each function runs once, in order.

PRAGMA user_version holds the number of migrations applied, so a database written by a newer deltamem (more
migrations than this one knows) is refused instead of being misread, and an older one is upgraded in place.
PRAGMA application_id marks the file as deltamem's.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from deltamem.memory.errors import SchemaError

APPLICATION_ID = 0x444D454D  # "DMEM"

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["projects"].create({"id": int, "root": str, "name": str, "created": str}, pk="id", not_null={"root"})
    db["projects"].create_index(["root"], unique=True)
    db["sessions"].create(
        {
            "id": str,
            "project_id": int,
            "title": str,
            "fingerprint": str,
            "parent_id": str,
            "parent_snapshot_id": int,
            "created": str,
            "updated": str,
        },
        pk="id",
        foreign_keys=[("project_id", "projects", "id")],
    )
    db["turns"].create(
        {
            "id": int,
            "session_id": str,
            "seq": int,
            "role": str,
            "text": str,
            "tokens": int,
            "tool_calls": str,
            "created": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
        not_null={"session_id", "seq", "role"},
    )
    db["turns"].create_index(["session_id", "seq"], unique=True)
    # A snapshot blob = prefix (its headers) + its tensors' bytes, each tensor one content-addressed piece.
    db["pieces"].create({"sha256": str, "bytes": int, "data": bytes}, pk="sha256")
    db["snapshots"].create(
        {
            "id": int,
            "fingerprint": str,
            "tokens_seen": int,
            "bytes": int,
            "sha256": str,  # the snapshot's own digest of header + payload (in its header)
            "prefix": bytes,
            "prefix_sha256": str,
            "created": str,
        },
        pk="id",
    )
    db["snapshot_pieces"].create(
        {"snapshot_id": int, "idx": int, "sha256": str},
        pk=("snapshot_id", "idx"),
        foreign_keys=[("snapshot_id", "snapshots", "id"), ("sha256", "pieces", "sha256")],
    )
    db["snapshot_pieces"].create_index(["sha256"])
    # Which snapshots a session can resume from, at which turn. A fork copies these rows, never the blobs.
    db["session_snapshots"].create(
        {"session_id": str, "snapshot_id": int, "turn_seq": int, "name": str},
        pk=("session_id", "snapshot_id"),
        foreign_keys=[("session_id", "sessions", "id"), ("snapshot_id", "snapshots", "id")],
    )
    db["session_snapshots"].create_index(["snapshot_id"])
    # The ingest ledger, append-only: a file re-read at a later turn gets a new row, so a rewind restores the
    # ledger that matches the state. sha256 null = the file was removed.
    db["ingested"].create(
        {
            "id": int,
            "session_id": str,
            "turn_seq": int,
            "path": str,
            "sha256": str,
            "mtime": float,
            "bytes": int,
            "tokens": int,
            "text": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
        not_null={"session_id", "turn_seq", "path"},
    )
    db["ingested"].create_index(["session_id", "path", "turn_seq"], unique=True)
    db["turns"].enable_fts(["text"], create_triggers=True, tokenize="porter")
    db["ingested"].enable_fts(["path", "text"], create_triggers=True, tokenize="porter")


@migration
def m002_checkpoints_and_retention(db: sqlite_utils.Database) -> None:
    # The agent's graph checkpoint saved with each snapshot, and a per-session retention override.
    db["session_snapshots"].add_column("checkpoint_id", str)
    db["sessions"].add_column("keep_last", int)


@migration
def m003_snapshot_tokens(db: sqlite_utils.Database) -> None:
    # The token ids a snapshot's state has consumed, as content-addressed chunks (pieces) of TOKEN_CHUNK int32s:
    # consecutive snapshots of a session share every full chunk, so a turn writes only its last chunk or two.
    db["snapshot_tokens"].create(
        {"snapshot_id": int, "idx": int, "sha256": str},
        pk=("snapshot_id", "idx"),
        foreign_keys=[("snapshot_id", "snapshots", "id"), ("sha256", "pieces", "sha256")],
    )
    db["snapshot_tokens"].create_index(["sha256"])


@migration
def m004_ingest_converter(db: sqlite_utils.Database) -> None:
    # What converted an ingested document (PDF, DOCX, ... e-mail) to the text that was fed, with its version.
    db["ingested"].add_column("converter", str)


@migration
def m005_leases(db: sqlite_utils.Database) -> None:
    # One writer per session: the process that holds it (host, pid, its start time, command) and since when.
    db["leases"].create(
        {"session_id": str, "host": str, "pid": int, "pid_start": str, "command": str, "acquired": float},
        pk="session_id",
        foreign_keys=[("session_id", "sessions", "id")],
    )


@migration
def m006_piece_objects(db: sqlite_utils.Database) -> None:
    # Pieces kept in an object store (memory/objects.py): a row's `object` is its key there (its `data` then NULL),
    # `state` 'deleting' while gc removes it; `settings` records the store's URL (key 'objects').
    db["pieces"].add_column("object", str)
    db["pieces"].add_column("state", str)
    db["settings"].create({"key": str, "value": str}, pk="key")


def migrate(db: sqlite_utils.Database, upto: int | None = None) -> None:
    """Apply the migrations this database lacks (up to `upto`, for tests); refuse one from a newer deltamem."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    if version > len(MIGRATIONS) and app_id == APPLICATION_ID:
        raise SchemaError(
            f"this database has schema version {version}, newer than this deltamem knows ({len(MIGRATIONS)}); "
            "upgrade deltamem to open it"
        )
    if app_id not in (0, APPLICATION_ID) or (version == 0 and db.table_names()) or version > len(MIGRATIONS):
        raise SchemaError("this SQLite file is not a deltamem database")
    target = len(MIGRATIONS) if upto is None else upto
    for i, fn in enumerate(MIGRATIONS[version:target], start=version + 1):
        with db.atomic():
            fn(db)
            db.execute(f"PRAGMA user_version = {i}")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

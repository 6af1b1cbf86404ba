"""Errors of the memory store a user can cause, each with a message that says what to do."""


class StoreError(Exception):
    """Base of memory-store errors; the CLI prints them as one line."""


class SchemaError(StoreError):
    """The database's schema is newer than this deltamem, or the file is not a deltamem database."""


class NotFound(StoreError, KeyError):
    """No such session, turn or snapshot."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class Ambiguous(StoreError):
    """A session reference that matches several sessions; `candidates` lists them (id, title, project)."""

    def __init__(self, message: str, candidates: list[dict]):
        super().__init__(message)
        self.candidates = candidates


class WrongProject(StoreError):
    """A session asked for by id from another project's folder."""


class CorruptSnapshot(StoreError):
    """A stored snapshot whose bytes no longer match their hashes."""


class SessionBusy(StoreError):
    """A session another live process holds (its lease): the message names the holder."""

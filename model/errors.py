"""Errors a user can cause, each with a message that says what to do."""


class DeltamemError(Exception):
    """Base of the errors deltamem reports to users as one line."""


class CheckpointError(DeltamemError, ValueError):
    """A model checkpoint that cannot be read or does not match its config."""


class SnapshotError(DeltamemError, ValueError):
    """A state snapshot that cannot be restored into this engine."""

"""The hybrid inference engine: load_model -> Engine (feed, snapshot, restore, generate, state_bytes)."""

from model.config import ModelConfig
from model.engine import Engine
from model.errors import CheckpointError, DeltamemError, SnapshotError
from model.loader import load_model

__all__ = ["CheckpointError", "DeltamemError", "Engine", "ModelConfig", "SnapshotError", "load_model"]

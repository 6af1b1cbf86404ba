"""The hybrid inference engine: load_model -> Engine (feed, snapshot, restore, generate, state_bytes).

Names are imported on first use (PEP 562), so `from model.errors import ...` does not pull in torch: commands
that never touch a model (`deltamem sessions ...`) start in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from model.errors import CheckpointError, DeltamemError, SnapshotError

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.engine import Engine
    from model.loader import load_model

_LAZY = {"ModelConfig": "model.config", "Engine": "model.engine", "load_model": "model.loader"}

__all__ = ["CheckpointError", "DeltamemError", "Engine", "ModelConfig", "SnapshotError", "load_model"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")

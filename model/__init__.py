"""The hybrid inference engine: load_model -> Engine (feed, snapshot, restore, generate, state_bytes).

Names are imported on first use (PEP 562), so `from deltamem.model.errors import ...` does not pull in torch: commands
that never touch a model (`deltamem sessions ...`) start in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from deltamem.model.errors import CheckpointError, DeltamemError, SnapshotError

if TYPE_CHECKING:
    from deltamem.model.config import ModelConfig
    from deltamem.model.engine import Engine
    from deltamem.model.loader import load_model

_LAZY = {
    "ModelConfig": "deltamem.model.config",
    "Engine": "deltamem.model.engine",
    "load_model": "deltamem.model.loader",
}

__all__ = ["CheckpointError", "DeltamemError", "Engine", "ModelConfig", "SnapshotError", "load_model"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltamem.model' has no attribute {name!r}")

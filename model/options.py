"""ModelOptions: which model to load and how, with one set of defaults for the CLI, the TUI, ChatDeltamem and
load_model. A field left out takes its DELTAMEM_* environment variable, else "auto" (the first CUDA GPU in bfloat16
if there is one, else the CPU in float32; the model's own window; the quantization and compiled decode step that are
fastest on this CPU within 2% perplexity). Nothing here imports torch: the CLI builds options before any model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from deltamem.model.engine import Engine

QUANTS = ("auto", "none", "f16", "int8", "int4")  # model/packed.py's and auto


def env_compile() -> bool | Literal["auto"]:
    """DELTAMEM_COMPILE: 1/on/true, 0/off/false, else auto."""
    env = os.environ.get("DELTAMEM_COMPILE", "auto").lower()
    return True if env in ("1", "on", "true") else False if env in ("0", "off", "false") else "auto"


def _env(name: str, default: str):
    return field(default_factory=lambda: os.environ.get(f"DELTAMEM_{name}", default))


@dataclass(frozen=True)
class ModelOptions:
    model: str = _env("MODEL", "default")
    """"default" (the built-in model), "random" (a small random model for tests), a checkpoint directory
    (config.json + safetensors) or a .gguf file."""
    device: str = _env("DEVICE", "auto")
    """"auto", "cpu", "cuda" or "cuda:N"."""
    dtype: str = _env("DTYPE", "auto")
    """"auto" (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16" or "float16"."""
    quant: str = _env("QUANT", "auto")
    """CPU weight-only quantization: "none", "f16", "int8", "int4" or "auto" (see load_model)."""
    compile: bool | Literal["auto"] = field(default_factory=env_compile)
    """CPU decode steps compiled ahead of time: True, False or "auto" (where a C++ compiler is found)."""
    window: int | None | Literal["auto"] = "auto"
    """Attention window in tokens; None: unbounded; "auto": the one the model was trained with, else 4096."""
    sink: int = 4
    """First tokens always kept in attention."""

    def __post_init__(self) -> None:
        if self.window != "auto" and self.window is not None and (isinstance(self.window, bool) or self.window < 1):
            raise ValueError("--window must be >= 1")
        if self.sink < 0:
            raise ValueError("--sink must be >= 0")
        if self.quant not in QUANTS:
            raise ValueError(f"--quant must be one of {', '.join(QUANTS)}; got {self.quant!r}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto'; got {self.compile!r}")

    @classmethod
    def default(cls, name: str):
        """One field's default (its DELTAMEM_* variable, else auto), reading no other field's variable."""
        return cls.__dataclass_fields__[name].default_factory()

    def load(self, prefill_chunk: int = 512) -> Engine:
        """The model as an Engine with an empty state."""
        from deltamem.model.loader import load_model

        return load_model(
            self.model, device=self.device, dtype=self.dtype, window=self.window, sink=self.sink,
            prefill_chunk=prefill_chunk, quant=self.quant, compile_decode=self.compile,
        )  # fmt: skip

"""Reading a GGUF file through the gguf package: the file opened with clear errors, a metadata field as a Python
value, a tensor dequantised. model/gguf_file.py (Llama) and model/gguf_qwen.py (Qwen3.5 / Qwen3-Next) map what
they read to Hugging Face names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltamem.model.errors import CheckpointError


def field_value(field: Any) -> Any:
    """A metadata field as a Python value. Uses only the long-standing `parts`/`data` layout of
    ReaderField, not `contents()`, so older gguf releases that pyproject allows work too."""
    import gguf

    def one(part: np.ndarray, vtype: Any) -> Any:
        return bytes(part).decode("utf-8") if vtype == gguf.GGUFValueType.STRING else part[0].item()

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def open_gguf(path: Path) -> Any:
    """A GGUFReader of `path`, with clear errors for a file that is not GGUF, cut off, or of the other byte order."""
    import gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if magic != b"GGUF":
        # Checked here because the reader's own message ("GGUF magic invalid") does not say what to do.
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        # The reader memory-maps the file and fails with numpy reshape/view errors when a header array
        # or a tensor runs past the end of the file, so a cut-off download lands here.
        raise CheckpointError(
            f"{path} is truncated or corrupt (re-download or re-convert it); the GGUF reader said: {e}"
        ) from e
    if reader.byte_order != "I":
        # gguf's dequantize() reinterprets raw bytes in host order, so a byte-swapped file would decode to
        # garbage without any error.
        raise CheckpointError(
            f"{path} is a GGUF file for the opposite byte order; convert it on this machine"
        )
    return reader


def dequantized(path: Path, t: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor as float32 in HF (numpy) dim order, dequantised by the gguf package (F32, F16, BF16, Q8_0, the
    K-quants Q4_K/Q5_K/Q6_K and the rest it knows)."""
    import gguf

    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot "
            f"dequantise; use a file quantised as F32/F16/BF16/Q8_0/Q4_K/Q5_K/Q6_K or similar"
        ) from e
    # F32 dequantises to a view of the read-only memory map: copy so the tensor owns writable memory
    # and the file can be closed.
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))

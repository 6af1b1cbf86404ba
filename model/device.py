"""Where a model runs: `--device auto|cpu|cuda|cuda:N` and `--dtype auto|float32|bfloat16|float16`.

auto = the first CUDA GPU in bfloat16 when one is present, else the CPU in float32. A choice the machine cannot
honour (CUDA asked but absent, a GPU index out of range, bfloat16 on a GPU without it, weights that do not fit in
the GPU's free memory) is refused before anything is loaded, with a DeviceChoiceError that says what to do.
"""

from __future__ import annotations

import torch

from deltamem.model.errors import DeviceChoiceError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_CHOICES = "auto, float32, bfloat16 or float16"
HEADROOM = 1 << 30  # GPU memory kept free beyond weights and state: activations, the CUDA graph, the allocator


def resolve(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype a request names, checked against this machine."""
    dev = _device(device)
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif str(dtype).lower() in DTYPES:
        dt = DTYPES[str(dtype).lower()]
    else:
        raise DeviceChoiceError(f"unknown dtype {dtype!r}: use {DTYPE_CHOICES}")
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise DeviceChoiceError(f"dtype {dt} is not supported: use {DTYPE_CHOICES}")
    if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(dev)
        raise DeviceChoiceError(f"{name} cannot run bfloat16; use --dtype float16 or float32")
    return dev, dt


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceChoiceError(f"unknown device {device!r}: use {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceChoiceError(f"device {device!r} is not supported: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceChoiceError(
            f"--device {device}: no CUDA GPU is available here (a CPU build of torch, or no driver); use --device cpu"
        )
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceChoiceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def check_fits(device: torch.device, need: int, what: str) -> None:
    """Refuse, before loading, weights + state that do not fit in the GPU's free memory (CPU: not checked)."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if need + HEADROOM > free:
        gib = 1 << 30
        raise DeviceChoiceError(
            f"{what} needs about {(need + HEADROOM) / gib:.1f} GiB on {device} ({need / gib:.1f} GiB of weights and "
            f"state + {HEADROOM / gib:.0f} GiB of headroom); {free / gib:.1f} of {total / gib:.1f} GiB are free. "
            "Use a smaller --dtype, a smaller --window, another GPU, or --device cpu"
        )

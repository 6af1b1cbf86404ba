"""Errors a user can cause, each with a message that says what to do."""


class DeltamemError(Exception):
    """Base of the errors deltamem reports to users as one line."""


class CheckpointError(DeltamemError, ValueError):
    """A model checkpoint that cannot be read or does not match its config."""


class SnapshotError(DeltamemError, ValueError):
    """A state snapshot that cannot be restored into this engine."""


class OutOfMemory(DeltamemError, MemoryError):
    """Not enough host or device memory for what was asked (a window too large, a state too big to restore)."""


class DeviceError(DeltamemError):
    """The device failed while working on sound input (a CUDA error), as opposed to a bad file or argument."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory errors: torch.OutOfMemoryError on a GPU; on the CPU a RuntimeError from the
    allocator; Python's MemoryError."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)
    ))


def resource_error(e: BaseException, doing: str) -> DeltamemError | None:
    """`e` as OutOfMemory or DeviceError if it is one (None if not), saying what was being done."""
    doing = f" {doing}" if doing else ""
    if is_out_of_memory(e):
        return OutOfMemory(f"not enough memory{doing}: {e}")
    if type(e).__name__ == "AcceleratorError" or (isinstance(e, RuntimeError) and "CUDA error" in str(e)):
        return DeviceError(f"the device failed{doing}: {e}")
    return None


class DeviceChoiceError(DeltamemError, ValueError):
    """A --device/--dtype this machine cannot honour for this model (refused before loading)."""


class GenerationError(DeltamemError):
    """The model failed while generating (an error in the forward pass that is not memory, device or input)."""

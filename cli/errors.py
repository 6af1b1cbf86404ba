"""Exit codes, and the one place that maps a failure to its exit code and one-line message.

1 bad input (a file, a model, a state, the memory database, an option's value), 2 bad arguments (argparse's own
code), 3 `run` stopped at its step limit, 4 the model failed (its chat template, generation), 5 not enough memory
or a device error.
"""

from __future__ import annotations

EXIT_ERROR = 1  # bad input: a file, a model, a state, the memory database, an option's value
EXIT_STEP_LIMIT = 3  # `deltamem run` stopped at --max-steps without an answer
EXIT_MODEL = 4  # the model failed (its chat template, generation)
EXIT_RESOURCE = 5  # not enough memory, or the device failed


def failure(e: Exception) -> tuple[int | None, str]:
    """The exit code and message for a failure, by its cause; (None, ...) for one that is a bug."""
    from deltamem.agent.prompt import TemplateError
    from deltamem.memory import pgdb
    from deltamem.memory.errors import StoreError
    from deltamem.model.errors import DeltamemError, DeviceError, GenerationError, OutOfMemory, resource_error

    if isinstance(e, OutOfMemory | DeviceError):
        return EXIT_RESOURCE, f"error: {e}"
    err = resource_error(e, "")  # torch's own out-of-memory and device errors, wherever they came from
    if err is not None:
        return EXIT_RESOURCE, f"error: {err}"
    if isinstance(e, TemplateError | GenerationError):
        return EXIT_MODEL, f"model error: {e}"
    if isinstance(e, (DeltamemError, StoreError, ValueError, OSError, *pgdb.DB_ERRORS)):
        return EXIT_ERROR, f"error: {e}"
    return None, ""
